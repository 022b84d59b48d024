//! `kiln-multi`: the multi-device layer of kiln.
//!
//! - [`mesh`]: [`Rank`] and [`WorldSize`], validated once so no function re-checks them;
//! - [`sampler`]: [`DistributedSampler`], PyTorch's `DistributedSampler` semantics with the
//!   epoch passed explicitly, so no rank can forget to reshuffle;
//! - [`collective`]: the [`Collective`] trait (all-reduce, broadcast, all-gather,
//!   reduce-scatter, barrier, each bounded by a timeout) and the in-process engine;
//! - [`data_parallel`]: [`DistributedDataParallel`], which keeps the replicas of any Burn
//!   module identical by broadcasting parameters from rank 0 and averaging gradients in
//!   buckets;
//! - [`device`]: [`DeviceSpec`], `--device cpu|cuda:N` checked before Burn opens a device;
//! - [`launch`]: whether this process is one rank of a job started by `mpirun` or `torchrun`;
//! - [`sharding`]: ZeRO stages 1 and 2: optimizer state and gradients split over the ranks;
//! - [`tensor_parallel`]: Megatron-style column- and row-parallel Linear layers;
//! - [`pipeline`]: stages placed on devices, trained with micro-batch schedules (GPipe, 1F1B).
//!
//! This crate knows nothing of kiln's models, recipes or CLI: it works on buffers, indices and
//! any Burn [`Module`](burn::module::Module).

pub mod collective;
pub mod data_parallel;
pub mod device;
mod error;
pub mod launch;
pub mod mesh;
pub mod pipeline;
pub mod sampler;
pub mod sharding;
pub mod tensor_parallel;
#[cfg(feature = "wgpu")]
mod wgpu_shared;

pub use collective::{
    Collective, CollectiveConfig, InProcessCollective, MeshRank, ReduceOp, Transport,
    all_reduce_sum_f64, run_group, run_in_process, run_mesh, shard_range,
};
pub use data_parallel::{BucketConfig, DistributedDataParallel, GradientBucket};
pub use device::DeviceSpec;
pub use error::{MultiError, Result};
pub use mesh::{MeshShape, Rank, WorldSize};
pub use sampler::{DistributedSampler, DistributedSamplerConfig};
pub use sharding::{
    FlatOptimizer, ParamState, ShardMemory, ZERO_STATE_MAGIC, ZeroConfig, ZeroOptimizer, ZeroStage,
    clip_coefficient,
};
