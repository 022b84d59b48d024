//! Optimizers, learning-rate schedules and gradient arithmetic of the trainer.
//!
//! - [`OptimizerConfig`]: SGD (momentum, Nesterov, weight decay), Adam and AdamW; each builds
//!   Burn's `ModuleOptimizer` for replicated runs (kiln's in-place [`Sgd`] kernel where it
//!   applies) and the matching [`kiln_multi::FlatOptimizer`] for ZeRO;
//! - [`LrSchedule`]: constant, step decay, cosine with linear warm-up, as a pure function of
//!   the optimizer-step count;
//! - [`grads`]: gradient accumulation, scaling and global-norm clipping over Burn's
//!   `GradientsParams`.

mod config;
pub mod grads;
mod schedule;
mod sgd;

pub use config::OptimizerConfig;
pub use schedule::LrSchedule;
pub use sgd::{MomentumState, Sgd, SgdState};
