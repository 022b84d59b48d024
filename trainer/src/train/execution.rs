use std::sync::Arc;

use burn::tensor::Device;
use kiln_multi::{
    BucketConfig, Collective, CollectiveConfig, DeviceSpec, Rank, Transport, WorldSize, ZeroStage,
};

use crate::error::{Result, TrainError};

/// Where and how [`Trainer::fit`](super::Trainer::fit) runs.
///
/// Every mode runs the same epoch loop; they differ only in how many replicas train and how
/// their gradients are synchronised.
#[derive(Debug, Clone)]
pub enum Execution {
    /// One replica on one device.
    Single(Device),
    /// Data parallel inside this process: one rank per device, each a thread with its own
    /// replica, gradients averaged through shared memory. The batch size is the global batch,
    /// split evenly over the ranks.
    DataParallel(DataParallelConfig),
    /// Data parallel across processes: this process is one rank of a group created outside
    /// (an MPI job started by `kiln launch` or `mpirun`), with its own replica on `device`.
    /// The batch size is the global batch, split evenly over the group's ranks.
    Process(ProcessGroupConfig),
}

/// Settings of [`Execution::Process`].
#[derive(Debug, Clone)]
pub struct ProcessGroupConfig {
    /// This rank's autodiff device.
    pub device: Device,
    /// This rank's handle on the group; its timeout bounds every exchange.
    pub collective: Arc<dyn Collective>,
    /// Gradient bucket sizes.
    pub buckets: BucketConfig,
    /// Shard the optimizer state (ZeRO-1) and the gradients (ZeRO-2) over the ranks instead
    /// of replicating them; `None` is plain data parallelism.
    pub zero: Option<ZeroStage>,
}

/// Settings of [`Execution::DataParallel`].
#[derive(Debug, Clone)]
pub struct DataParallelConfig {
    /// One autodiff device per rank; on CPU, the same Flex device repeated (ranks are logical).
    pub devices: Vec<Device>,
    /// Timeout of every collective.
    pub collective: CollectiveConfig,
    /// How the ranks exchange gradients: shared memory, or NCCL between the ranks' GPUs.
    pub transport: Transport,
    /// Gradient bucket sizes.
    pub buckets: BucketConfig,
    /// Shard the optimizer state (ZeRO-1) and the gradients (ZeRO-2) over the ranks instead
    /// of replicating them; `None` is plain data parallelism.
    pub zero: Option<ZeroStage>,
}

impl Execution {
    /// One device when `ranks` is one, else `ranks` data-parallel threads, with the default
    /// gradient buckets and `timeout` for every exchange. On the CPU the ranks share the Flex
    /// device and exchange through shared memory; on CUDA rank `r` runs on the `r`-th GPU
    /// from `device` and the ranks exchange over NCCL.
    ///
    /// # Errors
    /// [`TrainError::Multi`] when the device cannot be used (no CUDA in this build, no
    /// driver, too few GPUs).
    pub fn on_ranks(
        device: DeviceSpec,
        ranks: WorldSize,
        timeout: std::time::Duration,
        zero: Option<ZeroStage>,
    ) -> Result<Self> {
        let devices: Vec<Device> = device
            .devices(ranks.get())?
            .into_iter()
            .map(Device::autodiff)
            .collect();
        if ranks == WorldSize::ONE {
            return Ok(Execution::Single(
                devices.into_iter().next().expect("one device per rank"),
            ));
        }
        Ok(Execution::DataParallel(DataParallelConfig {
            devices,
            collective: CollectiveConfig { timeout },
            transport: device.transport(ranks.get())?,
            buckets: BucketConfig::default(),
            zero,
        }))
    }

    /// This process's rank: the group's rank of [`Execution::Process`], rank 0 otherwise
    /// (one device, or the threads of this process, whose results rank 0 returns). Rank 0
    /// writes checkpoints; the others should not print results.
    pub fn rank(&self) -> Rank {
        match self {
            Execution::Process(group) => group.collective.rank(),
            _ => Rank::ZERO,
        }
    }

    /// The number of ranks.
    ///
    /// # Errors
    /// [`TrainError::Config`] for data parallelism over no device.
    pub fn world_size(&self) -> Result<WorldSize> {
        match self {
            Execution::Single(_) => Ok(WorldSize::ONE),
            Execution::Process(group) => Ok(group.collective.world_size()),
            Execution::DataParallel(dp) => {
                WorldSize::new(dp.devices.len()).map_err(|_| TrainError::Config {
                    field: "ranks",
                    reason: "data parallelism needs at least one device".to_string(),
                })
            }
        }
    }
}
