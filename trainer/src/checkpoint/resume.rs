//! Where a run keeps its checkpoints, and how `--checkpoint`/`--resume` paths are resolved.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// Sub-directory of a run's output directory that holds its checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// Path of the checkpoint written after `epoch` in the run directory `run_dir`.
pub fn checkpoint_path(run_dir: &Path, epoch: usize) -> PathBuf {
    run_dir
        .join(CHECKPOINT_DIR)
        .join(format!("epoch-{epoch:04}.ckpt"))
}

/// Path of the checkpoint written inside epoch `epochs_done + 1`, after optimizer step `step`
/// of the run (`--checkpoint-every`, or a stop).
pub fn step_checkpoint_path(run_dir: &Path, epochs_done: usize, step: u64) -> PathBuf {
    run_dir
        .join(CHECKPOINT_DIR)
        .join(format!("epoch-{epochs_done:04}-step-{step:010}.ckpt"))
}

/// Where a checkpoint file name puts it in its run: (epochs done, steps), with an epoch's end
/// as step 0 of the next (steps into an epoch are always more), so that the order of the
/// positions is the order in which they were written.
pub(crate) fn checkpoint_position(name: &str) -> Option<(usize, u64)> {
    let stem = name.strip_prefix("epoch-")?.strip_suffix(".ckpt")?;
    match stem.split_once("-step-") {
        Some((epochs, step)) => Some((epochs.parse().ok()?, step.parse().ok()?)),
        None => Some((stem.parse().ok()?, 0)),
    }
}

/// Every checkpoint file of `run_dir` with its position, oldest first.
///
/// # Errors
/// [`TrainError::Io`] when the checkpoint directory exists but cannot be listed.
pub(crate) fn list_checkpoints(run_dir: &Path) -> Result<Vec<((usize, u64), PathBuf)>> {
    let dir = run_dir.join(CHECKPOINT_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| TrainError::io("list", &dir, e))?;
    let mut found: Vec<_> = entries
        .flatten()
        .filter_map(|entry| {
            let position = checkpoint_position(entry.file_name().to_str()?)?;
            Some((position, entry.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The latest checkpoint in `run_dir` (the last epoch's, or a later mid-epoch one), if any.
///
/// # Errors
/// [`TrainError::Io`] when the checkpoint directory exists but cannot be listed.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(run_dir)?.pop().map(|(_, path)| path))
}

/// Resolves what a user passed as `--checkpoint` or `--resume`: a checkpoint file, or a run's
/// output directory (then its latest checkpoint).
///
/// # Errors
/// [`TrainError::Checkpoint`] when the path does not exist or the directory holds no
/// checkpoint.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return latest_checkpoint(path)?.ok_or_else(|| {
            TrainError::checkpoint(
                path,
                format!("directory holds no {CHECKPOINT_DIR}/epoch-*.ckpt file"),
            )
        });
    }
    Err(TrainError::checkpoint(path, "no such file or directory"))
}

/// The latest checkpoint of the run in `run_dir`, read, with its path; `None` when the run
/// has none yet.
///
/// # Errors
/// [`TrainError::Io`] when the checkpoint directory cannot be listed or a checkpoint read;
/// [`TrainError::Checkpoint`] when the latest checkpoint is corrupt.
pub fn load_latest(run_dir: &Path) -> Result<Option<(PathBuf, super::Checkpoint)>> {
    latest_checkpoint(run_dir)?
        .map(|path| super::read_checkpoint(&path).map(|checkpoint| (path, checkpoint)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_highest_epoch_and_empty_dirs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            resolve_checkpoint(dir.path())
                .unwrap_err()
                .to_string()
                .contains("holds no")
        );
        for epoch in [2, 10, 9] {
            let path = checkpoint_path(dir.path(), epoch);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
        }
        let latest = resolve_checkpoint(dir.path()).unwrap();
        assert!(latest.ends_with("epoch-0010.ckpt"), "{latest:?}");
        // Inside epoch 11, after the end of epoch 10.
        let inside = step_checkpoint_path(dir.path(), 10, 1234);
        std::fs::write(&inside, b"x").unwrap();
        assert_eq!(resolve_checkpoint(dir.path()).unwrap(), inside);
        let next = checkpoint_path(dir.path(), 11);
        std::fs::write(&next, b"x").unwrap();
        assert_eq!(resolve_checkpoint(dir.path()).unwrap(), next);
        assert_eq!(resolve_checkpoint(&latest).unwrap(), latest);
        let missing = dir.path().join("nope");
        assert!(
            resolve_checkpoint(&missing)
                .unwrap_err()
                .to_string()
                .contains("no such file")
        );
    }
}
