use std::path::PathBuf;

/// Errors of the recipes: their own checks plus those of the trainer and the model import.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// Training, data or checkpoint failure.
    #[error(transparent)]
    Train(#[from] kiln_trainer::TrainError),
    /// A device that cannot be used, or a failed collective outside training.
    #[error(transparent)]
    Multi(#[from] kiln_multi::MultiError),
    /// Weights that do not load.
    #[error(transparent)]
    Import(#[from] kiln_models::ImportError),
    /// An output directory that already holds a run, when not resuming.
    #[error(
        "output directory {path} already holds checkpoints: pass --resume to continue that run, or choose another --out"
    )]
    RunExists {
        /// The output directory.
        path: PathBuf,
    },
    /// An input array whose shape the model cannot take.
    #[error("input {path} has shape {found:?}, but the model takes [N, {expected}]")]
    InputShape {
        /// The input file.
        path: PathBuf,
        /// Its shape.
        found: Vec<usize>,
        /// The per-sample shape the model expects, e.g. `1, 28, 28`.
        expected: String,
    },
    /// A checkpoint of a model this build does not know.
    #[error("checkpoint {path} holds a {model} model, which kiln cannot build")]
    UnknownModel {
        /// The checkpoint.
        path: PathBuf,
        /// The model name it records.
        model: String,
    },
    /// Options that cannot be used together or are out of range.
    #[error("{flag}: {reason}")]
    Options {
        /// The flag at fault, e.g. `--pipeline-stages`.
        flag: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A multi-process launch this process cannot join.
    #[error("cannot join the {launcher} launch: {reason}")]
    Launch {
        /// The launcher that set this process's environment.
        launcher: &'static str,
        /// Why the process cannot take part.
        reason: String,
    },
    /// A configuration file (`--config`) that cannot be used.
    #[error("configuration file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line of a bad key.
        reason: String,
    },
    /// Curves that cannot be drawn.
    #[error("cannot plot: {reason}")]
    Plot {
        /// Which run or metric, and why.
        reason: String,
    },
    /// A broken invariant inside kiln (a bug); the message names it.
    #[error("internal error: {0}")]
    Internal(String),
    /// Images of a size the model cannot take.
    #[error("data set images are {found:?}, but {model} takes {expected:?}")]
    ImageShape {
        /// The model.
        model: &'static str,
        /// Image shape of the data set.
        found: [usize; 3],
        /// Image shape the model takes.
        expected: [usize; 3],
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, RecipeError>;
