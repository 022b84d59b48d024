//! The training loop: [`Trainer::fit`] runs epochs, evaluates, checkpoints and resumes;
//! [`evaluate`] measures a model on a data set.

mod base;
mod epoch;
mod eval;
mod execution;

pub use base::{
    FitReport, GatherModel, PipelineSplit, RunLabels, SplitModel, SyncGradients,
    TensorParallelSplit, TrainData, Trainer,
};
pub use eval::{EvalMetrics, evaluate};
pub use execution::{DataParallelConfig, Execution, ProcessGroupConfig};
