use std::path::Path;

use crate::checkpoint::EpochMetrics;
use crate::checkpoint::file_write_atomic;
use crate::error::{Result, TrainError};

/// File name of the per-epoch metrics log in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Writes one JSON object per epoch to `run_dir/metrics.jsonl`, atomically.
///
/// The whole history is rewritten each time from the checkpointed metrics, so after a crash
/// and `--resume` the log holds exactly the epochs the checkpoints hold, without duplicates.
///
/// # Errors
/// [`TrainError::Io`] when the file cannot be written.
pub fn write_metrics_jsonl(run_dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    let path = run_dir.join(METRICS_FILE);
    let mut text = String::new();
    for metrics in history {
        let line = serde_json::to_string(metrics)
            .map_err(|e| TrainError::io("serialise metrics for", &path, e.into()))?;
        text.push_str(&line);
        text.push('\n');
    }
    file_write_atomic(&path, text.as_bytes())
}

/// The epochs of `run_dir/metrics.jsonl`, for listing and plotting runs; a missing file is no
/// epochs, and lines that do not parse (a foreign or damaged file) are skipped.
pub fn read_metrics_jsonl(run_dir: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(run_dir.join(METRICS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
