//! Pipeline (model) parallelism: a model split into stages placed on devices, trained with
//! micro-batches under a [`PipelineSchedule`] (naive, GPipe, 1F1B).
//!
//! - [`schedule`]: schedules as data ([`PipelineOp`] lists per stage), the theoretical bubble;
//! - [`PipelineStage`] / [`ModuleStage`]: a part of any Burn model with its forward function
//!   and its device (checked before every step);
//! - [`Pipeline`]: runs the forward and backward passes of a batch, one thread per stage, and
//!   measures the bubble; [`merge_grads`] hands the stages' gradients to the model's optimizer.

mod executor;
pub mod schedule;
mod stage;

pub use executor::{Pipeline, PipelineConfig, StepReport, merge_grads};
pub use schedule::{PipelineOp, PipelineSchedule, peak_in_flight, theoretical_bubble};
pub use stage::{Activation, ModuleStage, PipelineStage};
