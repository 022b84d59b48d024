//! Data parallelism: every rank holds a replica of the model, trains on its own part of each
//! batch, and averages gradients with the others before the optimizer step.
//!
//! - [`DistributedDataParallel`]: broadcast from rank 0 at start, bucketed gradient averaging,
//!   `no_sync` accumulation, all-reduce overlapped with backward on Flex (opt-in);
//! - [`GradientBucket`] / [`BucketConfig`]: gradients flattened in reverse registration order,
//!   like PyTorch's reducer (25 MiB buckets, 1 MiB first bucket);
//! - [`flatten_params`]: a model's parameters as one buffer (to compare replicas), and
//!   [`max_abs_diff`] between two of them.

mod bucket;
mod ddp;
mod device_buckets;
#[cfg(feature = "cuda")]
mod nccl_device;
mod overlap;
mod params;

pub(crate) use bucket::BucketLayout;
pub use bucket::{BucketConfig, GradientBucket};
pub use ddp::{
    DeviceAllReduce, DistributedDataParallel, broadcast_module, device_buckets_by_default,
    overlap_by_default,
};
pub use device_buckets::{BurnAllReduce, DeviceReduce, HostStaged};
#[cfg(feature = "cuda")]
pub use nccl_device::{NcclDeviceReduce, verify_device_all_reduce};
pub(crate) use params::{
    ensure_all_placed, flatten_grads, flatten_params_into, load_params_from, read_f32,
    trainable_params, unflatten_grads,
};
pub use params::{flatten_params, load_params, max_abs_diff};
