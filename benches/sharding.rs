//! Memory per rank under ZeRO: the optimizer-state and synchronised-gradient bytes each rank
//! keeps for torchvision's ResNet-18 (11.7 M parameters, 1000 classes), on 1, 2 and 4
//! in-process ranks, for ZeRO-1 and ZeRO-2 with SGD-momentum and Adam, next to plain data
//! parallelism (every rank keeping everything). The figures are the lengths of the buffers the
//! `ZeroOptimizer` of each rank allocated, read back through `ZeroOptimizer::memory`; rank 0's
//! are printed (ranks differ by at most one element). Prints one JSON object.
//!
//! Training throughput of ZeRO against plain data parallelism is in `benches/data_parallel.rs`.
//!
//! Run: `cargo bench --bench sharding`.

mod common;

use burn::tensor::Device;
use kiln::models::{ResNet, ResNetDepth};
use kiln::multi::{
    CollectiveConfig, FlatOptimizer, MultiError, WorldSize, ZeroConfig, ZeroOptimizer, ZeroStage,
    run_in_process,
};
use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    let device = Device::flex().autodiff();
    let model = ResNet::new(ResNetDepth::R18, 1000, &device);
    let sgd = FlatOptimizer::sgd_momentum(0.9);
    let mut rows: Vec<Value> = Vec::new();
    for optimizer in [sgd, FlatOptimizer::ADAM] {
        for stage in [ZeroStage::One, ZeroStage::Two] {
            for world in [1, 2, 4] {
                let config = ZeroConfig { stage, optimizer };
                let memory =
                    run_in_process(WorldSize::new(world)?, CollectiveConfig::default(), |c| {
                        let (_, zero) = ZeroOptimizer::new(model.clone(), c, config)?;
                        Ok::<_, MultiError>(zero.memory())
                    })?
                    .remove(0);
                rows.push(json!({
                    "optimizer": optimizer.name(),
                    "zero_stage": stage.number(),
                    "ranks": world,
                    "parameter_elements": memory.parameter_elements,
                    "optimizer_state_bytes_per_rank": memory.optimizer_state_bytes,
                    "gradient_bytes_per_rank": memory.gradient_bytes,
                    "unsharded_optimizer_state_bytes": memory.unsharded_optimizer_state_bytes,
                    "unsharded_gradient_bytes": memory.unsharded_gradient_bytes,
                    "optimizer_state_fraction": memory.optimizer_state_bytes as f64
                        / memory.unsharded_optimizer_state_bytes as f64,
                    "gradient_fraction": memory.gradient_bytes as f64
                        / memory.unsharded_gradient_bytes as f64,
                }));
            }
        }
    }
    println!(
        "{}",
        json!({ "benchmark": "sharding", "machine": common::machine(), "model": "resnet18", "per_rank": rows })
    );
    Ok(())
}
