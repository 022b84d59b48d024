//! `kiln-trainer`: the training loop and everything around it.
//!
//! - [`data`]: MNIST IDX reader (gzip or raw, strictly validated), batching, normalisation,
//!   `.npy` arrays;
//! - [`train`]: [`Trainer`] (the one epoch loop: any model through its [`Steps`] on any Burn
//!   data set, or an image classifier; evaluation, checkpoint after every epoch, exact resume,
//!   in every execution mode) and [`evaluate`];
//! - [`step`]: what a step returns ([`StepOutput`]: loss and [`Metric`]s) and the ready-made
//!   classification step;
//! - [`checkpoint`]: the checkpoint format (atomic, checksummed) and how runs find them;
//! - [`optim`]: optimizers (SGD, Adam, AdamW; kiln's in-place SGD kernel where it applies),
//!   learning-rate schedules, gradient accumulation and clipping;
//! - [`report`]: progress on stderr, `metrics.jsonl`, TensorBoard event files, `run.json`
//!   and the listing of runs;
//! - [`stop`]: stopping a run cleanly on SIGTERM/SIGINT, at a checkpoint.
//!
//! Shuffling goes through [`kiln_multi::DistributedSampler`], so single-device runs use the
//! same sampling code as data-parallel ones ([`Execution::DataParallel`]), whose gradients go
//! through [`kiln_multi::DistributedDataParallel`].

pub mod checkpoint;
mod config;
pub mod data;
mod error;
pub mod optim;
pub mod report;
pub mod step;
pub mod stop;
pub mod train;

pub use config::{LrGroup, TrainerConfig};
pub use error::{Result, TrainError};
pub use optim::{LrSchedule, OptimizerConfig};
pub use step::{GradStep, Metric, StepOutput, StepResult, classification_output};
pub use stop::StopSignal;
pub use train::{
    Data, DataParallelConfig, EvalMetrics, Execution, FitReport, PipelineSplit, ProcessGroupConfig,
    RunLabels, Steps, TensorParallelSplit, TensorParallelSteps, TrainData, Trainer, evaluate,
};
