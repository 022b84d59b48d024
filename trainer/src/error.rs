use std::path::PathBuf;

/// Errors of the trainer: bad data, bad configuration, checkpoint and I/O failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data file is corrupt, truncated or inconsistent with its companion file.
    #[error("bad data file {path}: {reason}")]
    Data {
        /// The file (or embedded name) that was being read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {field} {reason}")]
    Config {
        /// The offending field, as the user names it (`--batch-size`).
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A checkpoint cannot be used.
    #[error("bad checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file or run directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("write", "read", "create directory").
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The sampler could not split the data set.
    #[error(transparent)]
    Multi(#[from] kiln_multi::MultiError),
    /// The user's training or evaluation step failed.
    #[error("the {phase} step failed: {source}")]
    Step {
        /// `training` or `evaluation`.
        phase: &'static str,
        /// The step's own error.
        source: crate::step::StepError,
    },
    /// The run was asked to stop (SIGTERM, SIGINT or [`crate::StopSignal::request`]) and
    /// stopped after an optimizer step, at a checkpoint it can resume from.
    #[error(
        "stopped by {} after step {step}{}",
        crate::stop::signal_name(*signal),
        checkpoint.as_ref().map_or(String::new(), |c| format!(
            "; checkpoint {} written: continue with --resume",
            c.display()
        ))
    )]
    Stopped {
        /// The signal number (15 for SIGTERM, 2 for SIGINT).
        signal: i32,
        /// Optimizer steps done.
        step: u64,
        /// The checkpoint written there (on the reporting rank).
        checkpoint: Option<PathBuf>,
    },
    /// A Burn data set could not give an item.
    #[error("cannot read item of the {split} set: {reason}")]
    Dataset {
        /// `training` or `evaluation`.
        split: &'static str,
        /// The data set's error.
        reason: String,
    },
}

impl TrainError {
    pub(crate) fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
