//! `run.json`: what a run is and how far it got, kept up to date by the reporting rank, so
//! that `kiln runs` can tell a finished run from a failed or a stopped one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{host_name, unix_now};
use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};

/// File name of the run's state in its directory.
pub const STATE_FILE: &str = "run.json";

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Training (or killed without a word: see [`RunState::status_now`]).
    Running,
    /// Every planned epoch done.
    Finished,
    /// Ended with an error (or a panic); `error` says which.
    Failed,
    /// Stopped before its last epoch: by a signal, at a checkpoint (resume continues it), or
    /// its process is gone without a word (killed).
    Stopped,
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
        })
    }
}

/// The contents of `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// As last written.
    pub status: RunStatus,
    /// The recipe (`cnn-mnist`).
    pub recipe: String,
    /// The model (`simple-cnn`).
    pub model: String,
    /// How it runs: `1 device`, `data parallel x2`, `ZeRO-2 x2`, `tensor parallel x2`,
    /// `pipeline`.
    pub mode: String,
    /// Epochs the run is configured for.
    pub planned_epochs: usize,
    /// Epochs completed (checkpointed).
    pub epochs_done: usize,
    /// Unix time when this process started the run (or its resume).
    pub started: f64,
    /// Unix time of the last update.
    pub updated: f64,
    /// The reporting process.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunState {
    /// The status now: a run recorded as running whose process is gone from this host is
    /// stopped.
    pub fn status_now(&self) -> RunStatus {
        let alive = || Path::new(&format!("/proc/{}", self.pid)).exists();
        if self.status == RunStatus::Running && self.host == host_name() && !alive() {
            RunStatus::Stopped
        } else {
            self.status
        }
    }

    /// Reads `dir/run.json`; `None` when there is none.
    ///
    /// # Errors
    /// [`TrainError::Data`] when it exists but is not a run state.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(STATE_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::data(&path, e.to_string()))
    }
}

/// Keeps `run.json` up to date through a run; dropped without [`end`](Self::end) (a panic),
/// it records the run as failed.
pub(crate) struct RunStateWriter {
    path: PathBuf,
    state: RunState,
    ended: bool,
}

impl RunStateWriter {
    /// Records the run as running.
    pub(crate) fn start(
        run_dir: &Path,
        (recipe, model, mode): (&str, &str, String),
        planned_epochs: usize,
        epochs_done: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .map_err(|e| TrainError::io("create directory", run_dir, e))?;
        let writer = Self {
            path: run_dir.join(STATE_FILE),
            state: RunState {
                status: RunStatus::Running,
                recipe: recipe.into(),
                model: model.into(),
                mode,
                planned_epochs,
                epochs_done,
                started: unix_now(),
                updated: unix_now(),
                pid: std::process::id(),
                host: host_name(),
                error: None,
            },
            ended: false,
        };
        writer.write()?;
        Ok(writer)
    }

    /// Records an epoch done.
    pub(crate) fn epoch_done(&mut self, epochs_done: usize) -> Result<()> {
        self.state.epochs_done = epochs_done;
        self.write()
    }

    /// Records how the run ended: finished, or failed with the error.
    pub(crate) fn end<T>(mut self, result: &Result<T>) {
        self.ended = true;
        match result {
            Ok(_) => self.state.status = RunStatus::Finished,
            Err(TrainError::Stopped { .. }) => self.state.status = RunStatus::Stopped,
            Err(e) => {
                self.state.status = RunStatus::Failed;
                self.state.error = Some(e.to_string());
            }
        }
        // The run's own result is what the caller reports; a state that cannot be written
        // now (a full disk) must not replace it.
        let _ = self.write();
    }

    fn write(&self) -> Result<()> {
        let mut state = self.state.clone();
        state.updated = unix_now();
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| TrainError::io("serialise run state for", &self.path, e.into()))?;
        write_atomic(&self.path, text.as_bytes())
    }
}

impl Drop for RunStateWriter {
    fn drop(&mut self) {
        if !self.ended {
            self.state.status = RunStatus::Failed;
            self.state.error = Some("the run panicked".into());
            let _ = self.write();
        }
    }
}
