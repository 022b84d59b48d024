//! Collective communication: the [`Collective`] trait and its engines.
//!
//! - [`InProcessCollective`]: ranks are threads of one process sharing memory
//!   ([`run_in_process`] starts them).
//!
//! MPI (processes on one or many hosts) and NCCL (CUDA) engines implement the same trait.

mod base;
mod in_process;

pub use base::{Collective, CollectiveConfig, ReduceOp, shard_range};
pub use in_process::{InProcessCollective, run_in_process};
