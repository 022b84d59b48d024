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

/// The checkpoint of the highest epoch in `run_dir`, if any.
///
/// # Errors
/// [`TrainError::Io`] when the checkpoint directory exists but cannot be listed.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    let dir = run_dir.join(CHECKPOINT_DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| TrainError::io("list", &dir, e))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.strip_suffix(".ckpt"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(e, _)| epoch > *e) {
            best = Some((epoch, entry.path()));
        }
    }
    Ok(best.map(|(_, path)| path))
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
