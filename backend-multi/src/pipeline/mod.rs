//! Pipeline (model) parallelism: a model split into stages placed on devices, trained with
//! micro-batches under a [`PipelineSchedule`] (naive, GPipe, 1F1B).
//!
//! - [`schedule`]: schedules as data ([`PipelineOp`] lists per stage), the theoretical bubble;
//! - [`PipelineStage`] / [`ModuleStage`]: a part of any Burn model with its forward function
//!   and its device (checked before every step);
//! - [`Pipeline`]: runs the forward and backward passes of a batch, one thread per stage, and
//!   measures the bubble; [`merge_grads`] hands the stages' gradients to the model's optimizer.
//!
//! For a model `Net { features: Features, head: Head }` of your own:
//! ```text
//! let pipeline = Pipeline::new(NonZeroUsize::new(2).unwrap(), PipelineConfig {
//!     schedule: PipelineSchedule::OneFOneB,
//!     micro_batches: NonZeroUsize::new(4).unwrap(),
//!     timeout: Duration::from_secs(60),
//!     threads_per_stage: None,
//!     defer_weight_gradients: true,
//! })?;
//! for (images, targets) in batches {
//!     // Stages share the model's parameters; a wrong device is reported before running.
//!     let mut stages: Vec<Box<dyn PipelineStage>> = vec![
//!         Box::new(ModuleStage::new("features", net.features.clone(), Features::forward, dev0.clone())),
//!         Box::new(ModuleStage::new("head", net.head.clone(), Head::forward, dev1.clone())),
//!     ];
//!     let report = pipeline.run(&mut stages, Activation::Rank4(images), targets)?;
//!     let grads = merge_grads(&net, &mut stages);
//!     net = optimizer.step(lr, net, grads);
//! }
//! ```

mod executor;
pub mod schedule;
mod stage;

pub use executor::{Pipeline, PipelineConfig, StepReport, Targets, merge_grads};
pub use schedule::{PipelineOp, PipelineSchedule, peak_in_flight, theoretical_bubble};
pub use stage::{Activation, ModuleStage, PipelineStage, own_leaves};
