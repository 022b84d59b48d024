//! The training loop: [`Trainer::fit_model`] trains any model through its steps on any
//! Burn data set, [`Trainer::fit`] an image classifier; both run epochs, evaluate,
//! checkpoint and resume in every execution mode. [`evaluate`] measures a classifier on a
//! data set.

mod base;
mod data;
pub(crate) mod epoch;
mod eval;
mod execution;
mod labels;
mod rank;
mod resume_point;
mod tp_state;
mod zero_state;

pub use base::{
    FitReport, GatherModel, GradStepFn, PipelineInputs, PipelineSplit, RunLabels, SplitModel,
    StepFn, Steps, SyncGradients, TensorParallelSplit, TensorParallelSteps, Trainer,
};
pub use data::{Data, TrainData};
pub use eval::{EvalMetrics, evaluate};
pub use execution::{DataParallelConfig, Execution, ProcessGroupConfig};
