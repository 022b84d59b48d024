//! Mid-epoch checkpoints and stops: gathering every rank's progress through the epoch,
//! giving each rank its part back on resume, and keeping only the latest mid-epoch file.

use std::path::Path;

use kiln_multi::{Collective, ReduceOp};

use super::epoch::EpochProgress;
use crate::checkpoint::MidEpoch;
use crate::checkpoint::{checkpoint_position, list_checkpoints};
use crate::error::{Result, TrainError};

/// Every rank's `mine`, in rank order (all ranks call it together). The progress travels as
/// JSON bytes packed into the f32 words of an all-gather (copied, never added), so its f64
/// sums arrive bit for bit.
pub(super) fn gather_progress(
    group: Option<&dyn Collective>,
    mine: &EpochProgress,
) -> Result<Vec<EpochProgress>> {
    let Some(group) = group.filter(|g| g.world_size().get() > 1) else {
        return Ok(vec![mine.clone()]);
    };
    let bytes = serde_json::to_vec(mine).map_err(|e| internal(e.to_string()))?;
    let mut longest = [bytes.len() as f32];
    group.all_reduce(&mut longest, ReduceOp::Max)?;
    let words = (longest[0] as usize).div_ceil(4);
    let mut packed = vec![0.0f32; words];
    for (word, chunk) in packed.iter_mut().zip(bytes.chunks(4)) {
        let mut four = [0u8; 4];
        four[..chunk.len()].copy_from_slice(chunk);
        *word = f32::from_bits(u32::from_le_bytes(four));
    }
    let mut all = vec![0.0f32; words * group.world_size().get()];
    group.all_gather(&packed, &mut all)?;
    all.chunks(words)
        .map(|rank| {
            let bytes: Vec<u8> = rank
                .iter()
                .flat_map(|w| w.to_bits().to_le_bytes())
                .collect();
            let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            serde_json::from_slice(&bytes[..end]).map_err(|e| internal(e.to_string()))
        })
        .collect()
}

fn internal(reason: String) -> TrainError {
    TrainError::Config {
        field: "mid-epoch checkpoint",
        reason: format!("a rank's progress did not survive the exchange: {reason}"),
    }
}

/// This rank's part of a resumed mid-epoch checkpoint, which must come from as many ranks
/// (its samples were split over them).
pub(super) fn resumed_rank_progress(
    mid_epoch: Option<MidEpoch>,
    (rank, world): (usize, usize),
) -> Result<Option<EpochProgress>> {
    let Some(mid) = mid_epoch else {
        return Ok(None);
    };
    if mid.ranks.len() != world {
        return Err(TrainError::Config {
            field: "--resume",
            reason: format!(
                "the checkpoint was written inside an epoch by {} data-parallel rank(s), \
                 which split that epoch's samples between them: resume it on {} rank(s), or \
                 resume from the last epoch's checkpoint (checkpoints/epoch-NNNN.ckpt) on any \
                 number",
                mid.ranks.len(),
                mid.ranks.len()
            ),
        });
    }
    Ok(mid.ranks.into_iter().nth(rank))
}

/// Removes the mid-epoch checkpoints written before `latest` (the file just written): the
/// last one is all a resume needs, and each epoch's end keeps its own.
pub(super) fn remove_superseded_mid_epoch(run_dir: &Path, latest: &Path) -> Result<()> {
    let Some(position) = latest
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(checkpoint_position)
    else {
        return Ok(());
    };
    for (older, path) in list_checkpoints(run_dir)? {
        let mid_epoch = older.1 > 0;
        if mid_epoch && older < position {
            std::fs::remove_file(&path).map_err(|e| TrainError::io("remove", &path, e))?;
        }
    }
    Ok(())
}
