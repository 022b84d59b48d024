//! A folder of runs as rows: what `kiln runs` lists.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::METRICS_FILE;
use super::run_state::{RunState, RunStatus};
use crate::checkpoint::{CHECKPOINT_DIR, EpochMetrics, KeepBest};
use crate::error::{Result, TrainError};

/// The validation figure a run is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Judged {
    /// `accuracy` (higher is better) where the run reports it, else `loss` (lower is better).
    pub metric: &'static str,
    /// Its value.
    pub value: f64,
    /// The epoch it was reached in.
    pub epoch: usize,
}

/// One run directory, summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub path: PathBuf,
    /// The recipe, where `run.json` records it.
    pub recipe: Option<String>,
    /// The model, where recorded.
    pub model: Option<String>,
    /// How it ran (`data parallel x2`), where recorded.
    pub mode: Option<String>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Epochs configured, where recorded.
    pub planned_epochs: Option<usize>,
    /// The best epoch's validation figure.
    pub best: Option<Judged>,
    /// The last epoch's.
    pub last: Option<Judged>,
    /// Training samples per second over the run's epochs.
    pub samples_per_sec: Option<f64>,
    /// Bytes of every file under the directory.
    pub size_bytes: u64,
    /// Finished, running, stopped or failed; `None` for a run from before `run.json`.
    pub status: Option<RunStatus>,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix time the run (or its last resume) started, where recorded.
    pub started: Option<f64>,
}

/// The runs directly under `dir` (directories holding `run.json`, `metrics.jsonl` or
/// checkpoints), oldest first.
///
/// # Errors
/// [`TrainError::Io`] when `dir` cannot be listed; a run whose files are unreadable is still
/// listed, with what could be read.
pub fn list_runs(dir: &Path) -> Result<Vec<RunSummary>> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io("list", dir, e))?;
    let mut runs: Vec<RunSummary> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| is_run(path))
        .map(|path| summarise(&path))
        .collect();
    runs.sort_by(|a, b| {
        let key = |r: &RunSummary| r.started.unwrap_or(0.0);
        key(a).total_cmp(&key(b)).then_with(|| a.path.cmp(&b.path))
    });
    Ok(runs)
}

fn is_run(path: &Path) -> bool {
    path.is_dir()
        && [super::run_state::STATE_FILE, METRICS_FILE, CHECKPOINT_DIR]
            .iter()
            .any(|name| path.join(name).exists())
}

/// One run's row, from what its files hold.
pub fn summarise(path: &Path) -> RunSummary {
    let state = RunState::read(path).ok().flatten();
    let history = super::read_metrics_jsonl(path);
    let judged = |m: &EpochMetrics| match m.test_accuracy {
        Some(value) => Judged {
            metric: "accuracy",
            value,
            epoch: m.epoch,
        },
        None => Judged {
            metric: "loss",
            value: m.test_loss,
            epoch: m.epoch,
        },
    };
    // The epoch retention keeps as the best, judged the same way.
    let best = KeepBest::Auto
        .best_epoch(&history)
        .and_then(|epoch| history.iter().find(|m| m.epoch == epoch))
        .map(judged);
    RunSummary {
        path: path.to_path_buf(),
        recipe: state.as_ref().map(|s| s.recipe.clone()),
        model: state.as_ref().map(|s| s.model.clone()),
        mode: state.as_ref().map(|s| s.mode.clone()),
        epochs_done: history.len(),
        planned_epochs: state.as_ref().map(|s| s.planned_epochs),
        best,
        last: history.last().map(judged),
        samples_per_sec: (!history.is_empty()).then(|| EpochMetrics::throughput(&history)),
        size_bytes: disk_size(path),
        status: state.as_ref().map(RunState::status_now),
        error: state.as_ref().and_then(|s| s.error.clone()),
        started: state.as_ref().map(|s| s.started),
    }
}

/// Bytes of the files under `path`, symbolic links not followed.
fn disk_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => disk_size(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, test_loss: f64, accuracy: Option<f64>) -> String {
        let m = EpochMetrics {
            epoch,
            step: epoch as u64 * 10,
            train_loss: 1.0,
            test_loss,
            test_accuracy: accuracy,
            train_metrics: Default::default(),
            test_metrics: Default::default(),
            samples_per_sec: 100.0 * epoch as f64,
            train_seconds: 1.0,
            bubble_fraction: None,
            exchange_fraction: None,
        };
        serde_json::to_string(&m).unwrap()
    }

    #[test]
    fn best_and_last_epochs_by_accuracy_or_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(dir.path().join("not-a-run")).unwrap();
        let lines = [
            epoch(1, 0.5, Some(0.8)),
            epoch(2, 0.4, Some(0.9)),
            epoch(3, 0.45, Some(0.85)),
        ];
        std::fs::write(a.join(METRICS_FILE), lines.join("\n")).unwrap();
        let lines = [
            epoch(1, 0.5, None),
            epoch(2, 0.3, None),
            epoch(3, 0.4, None),
        ];
        std::fs::write(b.join(METRICS_FILE), lines.join("\n") + "\n{broken").unwrap();
        let runs = list_runs(dir.path()).unwrap();
        assert_eq!(runs.len(), 2);
        let (ra, rb) = (&runs[0], &runs[1]);
        assert_eq!((ra.epochs_done, ra.status), (3, None));
        let best = ra.best.unwrap();
        assert_eq!((best.metric, best.value, best.epoch), ("accuracy", 0.9, 2));
        assert_eq!(ra.last.unwrap().value, 0.85);
        // Samples over seconds: (100 + 200 + 300) / 3.
        assert_eq!(ra.samples_per_sec, Some(200.0));
        let best = rb.best.unwrap();
        assert_eq!((best.metric, best.value, best.epoch), ("loss", 0.3, 2));
        assert!(rb.size_bytes > 0);
    }
}
