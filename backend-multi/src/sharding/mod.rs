//! Sharding: memory per rank that falls as ranks are added.
//!
//! - [`ZeroOptimizer`]: DeepSpeed's ZeRO stages 1 and 2 (PyTorch's `ZeroRedundancyOptimizer`):
//!   the optimizer state, and with stage 2 the synchronised gradients, are split over the ranks;
//!   each rank updates its shard of the parameters and the shards are all-gathered.

mod flat;
mod zero;

pub use flat::FlatOptimizer;
pub use zero::{
    ParamState, ShardMemory, ZERO_STATE_MAGIC, ZeroConfig, ZeroOptimizer, ZeroStage,
    clip_coefficient,
};
