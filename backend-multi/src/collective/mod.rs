//! Collective communication: the [`Collective`] trait and its engines.
//!
//! - [`InProcessCollective`]: ranks are threads of one process sharing memory
//!   ([`run_in_process`] starts them);
//! - `mpi::MpiCollective` (feature `mpi`): one rank per process, on one host or many, over
//!   Open MPI; [`launch`](crate::launch) tells a process whether it was started as a rank.
//!
//! An NCCL (CUDA) engine will implement the same trait.

mod base;
mod in_process;
#[cfg(feature = "mpi")]
pub mod mpi;
mod verify;

pub use base::{Collective, CollectiveConfig, ReduceOp, shard_range};
pub use in_process::{InProcessCollective, run_in_process};
pub use verify::{VERIFY_LENGTHS, VerifyReport, verify_collective};
