use std::sync::Arc;

use burn::tensor::Device;
use kiln_multi::{BucketConfig, Collective, CollectiveConfig, WorldSize, ZeroStage};

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
    /// Gradient bucket sizes.
    pub buckets: BucketConfig,
    /// Shard the optimizer state (ZeRO-1) and the gradients (ZeRO-2) over the ranks instead
    /// of replicating them; `None` is plain data parallelism.
    pub zero: Option<ZeroStage>,
}

impl Execution {
    /// One device when `ranks` is one, else `ranks` data-parallel threads sharing `device`,
    /// with the default gradient buckets and `timeout` for every exchange.
    pub fn on_ranks(
        device: Device,
        ranks: WorldSize,
        timeout: std::time::Duration,
        zero: Option<ZeroStage>,
    ) -> Self {
        if ranks == WorldSize::ONE {
            Execution::Single(device)
        } else {
            Execution::DataParallel(DataParallelConfig {
                devices: vec![device; ranks.get()],
                collective: CollectiveConfig { timeout },
                buckets: BucketConfig::default(),
                zero,
            })
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
