//! Memory per rank of `kiln train gpt`'s default model (batch 32 x 64 tokens, AdamW) on one
//! device, on each of 2 tensor-parallel ranks and on each of 2 pipeline stages (1F1B, 4
//! micro-batches of 8): parameters, AdamW state and peak activations.
//!
//! - parameters: 4 bytes per parameter the model, the rank's part or the stage holds (counted
//!   from the module; in one process the stages and the replicated parts share the model's
//!   buffers, so their allocations would not show them);
//! - AdamW state: two `f32` moments per parameter; for one device also measured, as the growth
//!   of live heap bytes over one optimizer step (gradients consumed);
//! - peak activations, measured as live heap bytes counted by this binary's global allocator
//!   (every allocation and free, on any thread): the peak of live bytes over one forward and backward, above what was
//!   live before it (the autodiff graph's saved tensors, the transient buffers and the
//!   gradients). A pipeline stage runs as its thread does under 1F1B: stage `s` of `P` holds
//!   `P - s` micro-batches' forwards in flight before its first backward, so stage 0 runs two
//!   forwards, then a backward, and the last stage one forward and its backward.
//! - The tensor-parallel ranks run at once (threads of one process, an in-process group): the
//!   two ranks' figures are measured together and halved (the ranks have the same shapes).
//!
//! Prints one JSON object. Run: `cargo bench --bench gpt_memory`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::machine;
use kiln::models::gpt::GptConfig;
use kiln::multi::{Collective, CollectiveConfig, MultiError, WorldSize, run_in_process};
use kiln::recipes::gpt::tensor_parallel::TensorParallelGpt;
use kiln::trainer::data::TokenBatch;
use serde_json::{Value, json};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Restarts the peak at the current live bytes and returns them.
fn reset_peak() -> usize {
    let now = live();
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn peak_above(base: usize) -> usize {
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

const BATCH: usize = 32;
const MICRO_BATCHES: usize = 4;

/// A batch of `n` windows of random byte tokens (seeded: the same batch every run).
fn batch(n: usize, t: usize, seed: u64, device: &Device) -> TokenBatch {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut tokens = |len: usize| -> Vec<i64> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as i64
            })
            .collect()
    };
    let ids = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [n, t]), device);
    TokenBatch {
        inputs: ids(tokens(n * t)),
        targets: ids(tokens(n * t)),
    }
}

/// The whole model on one device: parameters, peak of one step's forward and backward, and
/// AdamW's state after one step.
fn one_device(config: &GptConfig, device: &Device) -> anyhow::Result<Value> {
    let model = config.init(device, 42)?;
    let data = batch(BATCH, config.block_size, 1, device);
    let base = reset_peak();
    let grads = model.loss(data.inputs, data.targets).backward();
    let activations = peak_above(base);
    let grads = GradientsParams::from_grads(grads, &model);
    let mut optimizer = AdamWConfig::new().init();
    let before = live();
    let grad_bytes = before.saturating_sub(base);
    let elements = model.num_params();
    let model = optimizer.step(1e-3, model, grads);
    let step_growth = (live() + grad_bytes).saturating_sub(before);
    drop(model);
    let mut one = row("1 device", elements, activations);
    one["adamw_step_growth_bytes"] = json!(step_growth);
    Ok(one)
}

/// One row of the table: parameter and AdamW bytes of `elements` parameters, and the peak.
fn row(layout: &str, elements: usize, activations: usize) -> Value {
    json!({
        "layout": layout,
        "parameters": elements,
        "parameter_bytes": elements * 4,
        "adamw_state_bytes": 2 * elements * 4,
        "peak_activation_bytes": activations,
    })
}

/// Each pipeline stage alone, as its thread runs it under 1F1B.
fn pipeline_stages(
    config: &GptConfig,
    device: &Device,
    stages: usize,
) -> anyhow::Result<Vec<Value>> {
    let model = config.init(device, 42)?;
    let micro = BATCH / MICRO_BATCHES;
    let parts = model.pipeline_stages(stages)?;
    drop(model);
    let mut rows = Vec::new();
    for (s, part) in parts.into_iter().enumerate() {
        let in_flight = (stages - s).min(MICRO_BATCHES);
        let base = reset_peak();
        let last = s + 1 == stages;
        let outputs: Vec<(Tensor<3>, TokenBatch)> = (0..in_flight)
            .map(|m| {
                let data = batch(micro, config.block_size, 10 + m as u64, device);
                let out = if s == 0 {
                    part.forward_tokens(data.inputs.clone().float())
                } else {
                    let hidden =
                        Tensor::<3>::ones([micro, config.block_size, config.embed], device);
                    part.forward_hidden(hidden.require_grad())
                };
                (out, data)
            })
            .collect();
        let mut outputs = outputs.into_iter();
        if let Some((out, data)) = outputs.next() {
            // The last stage's backward starts at the loss; the others' at the gradient they
            // receive, of their output's shape.
            let seed = if last {
                let [n, t, vocab] = out.dims();
                CrossEntropyLossConfig::new()
                    .init(device)
                    .forward(out.reshape([n * t, vocab]), data.targets.reshape([n * t]))
            } else {
                (out.clone() * out.detach()).sum()
            };
            drop(seed.backward());
        }
        let activations = peak_above(base);
        drop(outputs);
        let layout = format!(
            "pipeline stage {} of {stages} (1F1B, {MICRO_BATCHES} micro-batches of {micro}, \
             {in_flight} in flight)",
            s + 1
        );
        rows.push(row(&layout, part.num_params(), activations));
    }
    Ok(rows)
}

/// Both ranks of a tensor-parallel group at once, halved.
fn tensor_parallel(config: &GptConfig, device: &Device, ranks: usize) -> anyhow::Result<Value> {
    let model = config.init(device, 42)?;
    let world = WorldSize::new(ranks)?;
    let measured = run_in_process(
        world,
        CollectiveConfig::default(),
        |group: Arc<dyn Collective>| {
            let first = group.rank().index() == 0;
            let part = TensorParallelGpt::split(&model, Arc::clone(&group))?;
            let data = batch(BATCH, config.block_size, 1, device);
            group.barrier()?;
            let base = if first { reset_peak() } else { 0 };
            group.barrier()?;
            let step = part.train_step(data).map_err(|e| MultiError::Config {
                field: "tensor-parallel step",
                reason: e.to_string(),
            })?;
            group.barrier()?;
            let activations = peak_above(base);
            drop(step);
            Ok::<_, MultiError>((activations, part.num_params()))
        },
    )?;
    let (activations, elements) = measured[0];
    let layout = format!("tensor parallel, each of {ranks} ranks (peak of both, halved)");
    Ok(row(&layout, elements, activations / ranks))
}

fn main() -> anyhow::Result<()> {
    let device = Device::flex().autodiff();
    let config = GptConfig::small();
    let mut rows = vec![one_device(&config, &device)?];
    rows.extend(pipeline_stages(&config, &device, 2)?);
    rows.push(tensor_parallel(&config, &device, 2)?);
    let whole = rows[0].clone();
    for row in &mut rows {
        for key in ["parameters", "peak_activation_bytes"] {
            let fraction = row[key].as_f64().unwrap_or(0.0) / whole[key].as_f64().unwrap_or(1.0);
            row[format!("{key}_vs_1_device")] = json!(fraction);
        }
    }
    println!(
        "{}",
        json!({
            "benchmark": "gpt_memory",
            "machine": machine(),
            "model": "4 layers, 4 heads, 128 wide, 64 tokens (kiln train gpt's default), batch 32",
            "per_rank": rows,
        })
    );
    Ok(())
}
