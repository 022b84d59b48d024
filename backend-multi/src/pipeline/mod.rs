//! Pipeline (model) parallelism: a model split into stages placed on devices, trained with
//! micro-batches under a [`PipelineSchedule`] (naive, GPipe, 1F1B).
//!
//! - [`schedule`]: schedules as data ([`PipelineOp`] lists per stage), the theoretical bubble;
//! - [`PipelineStage`] / [`ModuleStage`]: any Burn module with its forward function, its
//!   device (checked before the first step) and its optimizer;
//! - [`Pipeline`]: runs a training step, one thread per stage, and measures the bubble.

mod executor;
pub mod schedule;
mod stage;

pub use executor::{Pipeline, PipelineConfig, StepReport};
pub use schedule::{PipelineOp, PipelineSchedule, peak_in_flight, theoretical_bubble};
pub use stage::{Activation, ModuleStage, PipelineStage};
