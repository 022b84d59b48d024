//! `kiln bench`: kiln's throughput on this machine's device, optionally next to PyTorch in the
//! same run (its twin script alternating with kiln's rounds), with the ratios.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use kiln_multi::DeviceSpec;
use kiln_recipes::bench::{RESNET_WORKLOADS, ResNetBench, median, run_python_twin};
use serde_json::{Map, Value, json};

/// What `kiln bench` measures.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Workload {
    /// ResNet-18 (1,000 classes): training steps (SGD with momentum) at batch 8 of 224x224 and
    /// batch 32 of 32x32, inference at batch 32 of 224x224.
    Resnet18,
}

/// Flags of `kiln bench`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln bench resnet18                                   # on the CPU, 2 rounds of 3 steps each
  kiln bench resnet18 --device cuda:0 --rounds 3 --reps 10
  kiln bench resnet18 --device cuda:0 --pytorch benches/resnet_pytorch.py --json

Figures are samples/s, medians over rounds x reps, after one warm-up of each workload.")]
pub struct BenchArgs {
    /// The workload.
    #[arg(value_enum)]
    workload: Workload,
    /// cpu, cuda:N (a build with --features cuda) or wgpu:N (--features wgpu).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Rounds; with --pytorch, the twin runs once after each of kiln's rounds.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Timed passes of each workload per round.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Only this workload (train_b8_224, train_b32_32 or infer_b32_224).
    #[arg(long, value_name = "NAME", value_parser = ["train_b8_224", "train_b32_32", "infer_b32_224"])]
    only: Option<String>,
    /// PyTorch twin to run with `--reps N --device D` after each round (the repository's
    /// benches/resnet_pytorch.py); its figures and the ratios join the report.
    #[arg(long, value_name = "SCRIPT")]
    pytorch: Option<PathBuf>,
}

/// Runs the benchmark and prints its figures (one JSON object with `--json`).
pub fn run(args: &BenchArgs, json_output: bool, quiet: bool) -> anyhow::Result<()> {
    let Workload::Resnet18 = args.workload;
    if let Some(script) = &args.pytorch {
        anyhow::ensure!(
            script.is_file(),
            "--pytorch {}: no such file (the twin is benches/resnet_pytorch.py in kiln's repository)",
            script.display()
        );
    }
    let device = args.device.device()?;
    let workloads: Vec<_> = RESNET_WORKLOADS
        .iter()
        .filter(|w| args.only.as_deref().is_none_or(|o| o == w.name))
        .collect();
    let say = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let mut bench = ResNetBench::new(&device);
    for workload in &workloads {
        let _ = bench.run(workload);
    }
    let mut kiln: Vec<Vec<f64>> = vec![Vec::new(); workloads.len()];
    let mut pytorch: Vec<Value> = Vec::new();
    let mut pytorch_error = None;
    for round in 1..=args.rounds {
        for (workload, figures) in workloads.iter().zip(&mut kiln) {
            for _ in 0..args.reps {
                figures.push(bench.run(workload));
            }
        }
        say(format!("round {round}/{}: kiln done", args.rounds));
        // The twin runs after each round (alternating, so both see the same machine state),
        // until it fails once.
        if let (Some(script), None) = (&args.pytorch, &pytorch_error) {
            let reps = args.reps.to_string();
            let device = args.device.to_string();
            match run_python_twin(script, &["--reps", &reps, "--device", &device]) {
                Ok(figures) => pytorch.push(figures),
                Err(e) => {
                    say(format!("PyTorch comparison skipped: {e}"));
                    pytorch_error = Some(e);
                }
            }
        }
    }
    let mut ours = Map::new();
    let mut theirs = Map::new();
    let mut ratios = Map::new();
    for (workload, figures) in workloads.iter().zip(kiln) {
        let k = median(figures);
        ours.insert(workload.name.into(), json!(k));
        let torch: Vec<f64> = pytorch
            .iter()
            .filter_map(|p| p[workload.name].as_f64())
            .collect();
        if !torch.is_empty() {
            let t = median(torch);
            theirs.insert(workload.name.into(), json!(t));
            ratios.insert(workload.name.into(), json!(k / t));
        }
    }
    if json_output {
        println!(
            "{}",
            json!({
                "workload": "resnet18",
                "unit": "samples/s",
                "device": args.device.to_string(),
                "rounds": args.rounds,
                "reps_per_round": args.reps,
                "kiln": ours,
                "pytorch": (!theirs.is_empty()).then_some(&theirs),
                "kiln_over_pytorch": (!ratios.is_empty()).then_some(&ratios),
                "pytorch_error": pytorch_error,
            })
        );
    } else {
        println!("ResNet-18 on {}, samples/s (median):", args.device);
        for (name, k) in &ours {
            let k = k.as_f64().unwrap_or(f64::NAN);
            match (theirs.get(name), ratios.get(name)) {
                (Some(t), Some(r)) => println!(
                    "  {name:<14} kiln {k:>9.2}   PyTorch {:>9.2}   kiln/PyTorch {:.2}x",
                    t.as_f64().unwrap_or(f64::NAN),
                    r.as_f64().unwrap_or(f64::NAN)
                ),
                _ => println!("  {name:<14} kiln {k:>9.2}"),
            }
        }
    }
    Ok(())
}
