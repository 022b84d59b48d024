//! Collective communication: the [`Collective`] trait and its engines.
//!
//! - [`InProcessCollective`]: ranks are threads of one process sharing memory
//!   ([`run_in_process`] starts them);
//! - `mpi::MpiCollective` (feature `mpi`): one rank per process, on one host or many, over
//!   Open MPI; [`launch`](crate::launch) tells a process whether it was started as a rank.
//!
//! - `nccl::NcclCollective` (feature `cuda`): CUDA GPUs over NCCL, in one process
//!   ([`run_group`] with [`Transport::Nccl`]) or across processes (joined through an MPI group).

mod base;
#[cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "used by the NCCL engine; tested")
)]
mod blocks;
mod group;
mod in_process;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub(crate) mod verify;

pub use base::{Collective, CollectiveConfig, ReduceOp, all_reduce_sum_f64, shard_range};
pub use group::{MeshRank, Transport, run_group, run_mesh};
pub use in_process::{InProcessCollective, run_in_process};
pub use verify::{VERIFY_LENGTHS, VerifyReport, verify_collective};
