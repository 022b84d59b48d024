//! GPT training throughput (`kiln train gpt`'s default model, batches of 32 windows of 64
//! bytes of Tiny Shakespeare) in every execution mode the recipe has, on this machine's
//! cores, and the PyTorch twin (`benches/gpt_pytorch.py`, 2 threads) on the same steps.
//!
//! The "kernels off" row is the single device with Burn's own ops where kiln's kernels would
//! run (the transformer's GELU), in the same rounds: the A/B of those kernels.
//!
//! Each round runs every configuration once, in order, for `--steps` optimizer steps through
//! the recipe itself (`kiln::recipes::gpt::run`: the trainer, its data and checkpoint at the
//! end); the throughput is the trainer's (training time only). Medians over `--rounds`.
//! Prints one JSON object.
//!
//! Run: `cargo bench --bench gpt` (options: `-- --rounds R --steps N --kiln-only --only TEXT`;
//! `--only` keeps the modes whose name contains TEXT).

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::{arg, machine, median, median_field, run_pytorch_with, string_arg};
use kiln::multi::pipeline::PipelineSchedule;
use kiln::multi::{DeviceSpec, WorldSize, ZeroStage};
use kiln::recipes::cnn_mnist::{PipelineOptions, RunTarget, TrainerOverrides};
use kiln::recipes::gpt::{GptRecipeConfig, default_options, run};
use kiln::trainer::report::Verbosity;
use serde_json::{Value, json};

const BATCH: usize = 32;

/// One execution mode of the recipe.
struct Mode {
    name: &'static str,
    ranks: usize,
    zero: Option<ZeroStage>,
    tensor_parallel: Option<usize>,
    pipeline_stages: Option<usize>,
    /// kiln's CPU kernels (GELU here) on; off: Burn's own ops (`KILN_CPU_KERNELS=burn`).
    kernels: bool,
}

const MODES: [Mode; 10] = [
    mode("1 device", 1, None, None, None),
    burn_ops(mode(
        "1 device, Burn's ops (kernels off)",
        1,
        None,
        None,
        None,
    )),
    mode("data parallel 2", 2, None, None, None),
    mode(
        "data parallel 2, ZeRO-1",
        2,
        Some(ZeroStage::One),
        None,
        None,
    ),
    mode("tensor parallel 2", 1, None, Some(2), None),
    mode("pipeline 2 (1F1B, 4 micro-batches)", 1, None, None, Some(2)),
    mode("data parallel 2 x pipeline 2", 2, None, None, Some(2)),
    mode(
        "data parallel 2 x tensor parallel 2",
        2,
        None,
        Some(2),
        None,
    ),
    mode("tensor parallel 2 x pipeline 2", 1, None, Some(2), Some(2)),
    mode(
        "data parallel 2 x tensor parallel 2 x pipeline 2",
        2,
        None,
        Some(2),
        Some(2),
    ),
];

const fn mode(
    name: &'static str,
    ranks: usize,
    zero: Option<ZeroStage>,
    tensor_parallel: Option<usize>,
    pipeline_stages: Option<usize>,
) -> Mode {
    Mode {
        name,
        ranks,
        zero,
        tensor_parallel,
        pipeline_stages,
        kernels: true,
    }
}

/// `mode` with kiln's CPU kernels switched off.
const fn burn_ops(mut mode: Mode) -> Mode {
    mode.kernels = false;
    mode
}

/// Training tokens per second of `steps` steps in `mode`.
fn tokens_per_sec(mode: &Mode, steps: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut options = default_options();
    options.train_limit = Some(steps * BATCH);
    let config = GptRecipeConfig {
        options,
        overrides: TrainerOverrides {
            epochs: Some(1),
            batch_size: Some(BATCH),
            ..TrainerOverrides::default()
        },
        target: RunTarget::Fresh(dir.path().join("run")),
        verbosity: Verbosity::Quiet,
        ranks: WorldSize::new(mode.ranks)?,
        zero: mode.zero,
        tensor_parallel: mode.tensor_parallel.map(WorldSize::new).transpose()?,
        pipeline: mode.pipeline_stages.map(|stages| PipelineOptions {
            stages: NonZeroUsize::new(stages).unwrap_or(NonZeroUsize::MIN),
            micro_batches: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
            schedule: PipelineSchedule::OneFOneB,
        }),
        collective_timeout: Duration::from_secs(300),
        device: DeviceSpec::Cpu,
        process_group: None,
        run_config: None,
    };
    kiln::kernels::set_enabled(mode.kernels);
    let report = run(&config);
    kiln::kernels::set_enabled(true);
    Ok(report?.tokens_per_sec)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `kiln` binary runs: without it every large op output is a fresh `mmap` whose
    // pages the kernel zero-fills (the bench measured 13.4k tokens/s without, the CLI ~22k).
    kiln::kernels::malloc::keep_large_buffers(true);
    let rounds = arg("--rounds", 3);
    let steps = arg("--steps", 30);
    let kiln_only = std::env::args().any(|a| a == "--kiln-only");
    let only = string_arg("--only").unwrap_or_default();
    let modes: Vec<&Mode> = MODES.iter().filter(|m| m.name.contains(&only)).collect();
    let mut kiln: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut pytorch: Vec<Value> = Vec::new();
    for round in 0..rounds {
        for (mode, figures) in modes.iter().zip(&mut kiln) {
            let figure = tokens_per_sec(mode, steps)?;
            eprintln!("round {round}: kiln {}: {figure:.0} tokens/s", mode.name);
            figures.push(figure);
        }
        if !kiln_only {
            let steps = steps.to_string();
            let args = ["--steps", &steps, "--batch-size", "32", "--threads", "2"];
            if let Some(run) = run_pytorch_with("gpt_pytorch.py", &args) {
                eprintln!(
                    "round {round}: pytorch: {} tokens/s",
                    run["train_tokens_per_sec"]
                );
                pytorch.push(run);
            }
        }
    }
    let medians: Vec<f64> = kiln.into_iter().map(median).collect();
    let torch = median_field(&pytorch, "train_tokens_per_sec");
    let modes: Vec<Value> = modes
        .iter()
        .zip(&medians)
        .map(|(mode, &tokens)| {
            json!({
                "mode": mode.name,
                "tokens_per_sec": tokens,
                "vs_pytorch": torch.map(|t| tokens / t),
            })
        })
        .collect();
    let report = json!({
        "benchmark": "gpt",
        "machine": machine(),
        "model": "4 layers, 4 heads, 128 wide, 64 tokens of context (kiln train gpt's default)",
        "batch_windows": BATCH,
        "steps": steps,
        "rounds": rounds,
        "kiln": modes,
        "pytorch_tokens_per_sec": torch,
        "pytorch": pytorch.first().map(|r| r["framework"].clone()),
    });
    println!("{report}");
    Ok(())
}
