//! `kiln-trainer`: the training loop and everything around it.
//!
//! - [`data`]: MNIST IDX reader (gzip or raw, strictly validated), batching, normalisation,
//!   `.npy` arrays;
//! - [`train`]: [`Trainer`] (the one epoch loop: SGD with momentum, evaluation, checkpoint
//!   after every epoch, exact resume) and [`evaluate`];
//! - [`checkpoint`]: the checkpoint format (atomic, checksummed) and how runs find them;
//! - [`optim`]: the SGD-with-momentum optimizer the trainer runs (Burn's, through kiln's CPU
//!   kernel);
//! - [`report`]: progress on stderr and `metrics.jsonl`.
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
pub mod train;

pub use config::{LrGroup, TrainerConfig};
pub use error::{Result, TrainError};
pub use train::{
    DataParallelConfig, EvalMetrics, Execution, FitReport, PipelineSplit, ProcessGroupConfig,
    RunLabels, TensorParallelSplit, TrainData, Trainer, evaluate,
};
