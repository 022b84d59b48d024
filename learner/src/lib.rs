//! `kiln-learner`: kiln's data parallelism for burn-train's `Learner`.
//!
//! A burn-train program (a model with `TrainStep`/`InferenceStep`, Burn data loaders,
//! burn-train's metrics and checkpointer) switches to kiln's collectives by changing its
//! strategy line (the whole program, compiled and run by CI: `examples/own-model/src/learner.rs`):
//!
//! ```text
//! SupervisedTraining::new(dir, train_loader, valid_loader)
//!     .with_training_strategy(KilnDataParallel::threads(2, device).into())
//!     .launch(learner);
//! ```
//!
//! [`KilnDataParallel`] runs one rank per thread (or, under `kiln launch`, this process as one
//! rank of an MPI group): each rank trains on its own slice of the training items, the
//! gradients are averaged in kiln's buckets (`kiln_multi::DistributedDataParallel`) with a
//! timeout on every exchange, and every replica takes the same optimizer step, which is the
//! step of one device on the ranks' batches together.

mod strategy;

pub use strategy::KilnDataParallel;
