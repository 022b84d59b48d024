//! SimpleCNN throughput benchmark: training (batch 64, SGD momentum, through `Trainer::fit`,
//! evaluation excluded) and evaluation (batch 256, through `evaluate`), on the embedded MNIST
//! subset, with kiln's CPU kernels (`kiln_kernels`, the default) and with Burn's own ops
//! (`kiln_kernels::set_enabled(false)`), A/B in the same process.
//!
//! When `python3` with `torch` is installed, the same workloads run in PyTorch
//! (benches/simple_cnn_pytorch.py, 2 threads) after each round, alternating with kiln; the
//! medians over all rounds give the ratios. Set `KILN_BENCH_NO_PYTORCH=1` to skip PyTorch.
//! Prints one JSON object.
//!
//! Run: `cargo bench --bench simple_cnn` (options: `-- --rounds N --reps N --train-samples N
//! --kiln-only`).

mod common;

use std::num::NonZeroUsize;
use std::time::Instant;

use burn::tensor::Device;
use common::{arg, median, median_field, run_pytorch};
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::{MnistDataset, MnistSplit};
use kiln::trainer::report::Verbosity;
use kiln::trainer::{Execution, RunLabels, TrainData, Trainer, TrainerConfig, evaluate};
use serde_json::json;

/// Samples per second of `reps` training epochs and `reps` evaluations (after one warm-up of
/// each), with kiln's kernels on or off.
fn measure_kiln(
    kernels: bool,
    reps: usize,
    train: &MnistDataset,
    test: &MnistDataset,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    kiln::kernels::set_enabled(kernels);
    let device = Device::flex().autodiff();

    // Training: one epoch over the training samples per repetition (the first is warm-up).
    let mut train_rates = Vec::new();
    for rep in 0..=reps {
        let dir = tempfile::tempdir()?;
        let config = TrainerConfig {
            epochs: 1,
            ..TrainerConfig::default()
        };
        let labels = RunLabels {
            recipe: "bench".into(),
            model: "simple-cnn".into(),
            quantization: None,
            options: Default::default(),
        };
        let trainer = Trainer::new(config, dir.path(), labels)?.with_verbosity(Verbosity::Quiet);
        let model = SimpleCnnConfig::new().init(&device, rep as u64);
        let data = TrainData {
            train,
            test: &test.take(256),
        };
        let execution = Execution::Single(device.clone());
        let (_, report) = trainer.fit(model, SimpleCnn::forward, data, None, &execution)?;
        if rep > 0 {
            train_rates.push(report.samples_per_sec());
        }
    }

    // Evaluation: the whole test split in batches of 256.
    let model = SimpleCnnConfig::new().init(&device, 0);
    let mut eval_rates = Vec::new();
    for rep in 0..=reps {
        let start = Instant::now();
        let metrics = evaluate(
            &model,
            SimpleCnn::forward,
            test,
            NonZeroUsize::new(256).expect("256 is not zero"),
            &device,
        );
        if rep > 0 {
            eval_rates.push(metrics.samples as f64 / start.elapsed().as_secs_f64());
        }
    }
    Ok((train_rates, eval_rates))
}

fn main() -> anyhow::Result<()> {
    // As the `kiln` command line runs (both kiln runs alike).
    kiln::kernels::malloc::keep_large_buffers(true);
    let rounds = arg("--rounds", 3).max(1);
    // `--kiln-only` skips the Burn-ops runs (for profiling the kernels' run alone).
    let kiln_only = std::env::args().any(|a| a == "--kiln-only");
    let reps = arg("--reps", 2).max(1);
    let train_samples = arg("--train-samples", 1920);
    let train = MnistSource::Embedded
        .load(MnistSplit::Train)?
        .take(train_samples);
    let test = MnistSource::Embedded.load(MnistSplit::Test)?;

    let (mut kiln_train, mut kiln_eval) = (Vec::new(), Vec::new());
    let (mut burn_train, mut burn_eval) = (Vec::new(), Vec::new());
    let mut pytorch_runs = Vec::new();
    for round in 0..rounds {
        let (t, e) = measure_kiln(true, reps, &train, &test)?;
        kiln_train.extend(t);
        kiln_eval.extend(e);
        if !kiln_only {
            let (t, e) = measure_kiln(false, reps, &train, &test)?;
            burn_train.extend(t);
            burn_eval.extend(e);
        }
        pytorch_runs.extend(run_pytorch("simple_cnn_pytorch.py", reps, train_samples));
        eprintln!("round {}/{rounds} done", round + 1);
    }
    kiln::kernels::set_enabled(true);

    let kiln = (median(kiln_train.clone()), median(kiln_eval.clone()));
    let burn = if kiln_only {
        (f64::NAN, f64::NAN)
    } else {
        (median(burn_train.clone()), median(burn_eval.clone()))
    };
    let pytorch = (
        median_field(&pytorch_runs, "train_samples_per_sec"),
        median_field(&pytorch_runs, "eval_samples_per_sec"),
    );
    let ratio = |a: f64, b: Option<f64>| b.map(|b| a / b);
    let report = json!({
        "benchmark": "simple_cnn",
        "machine": common::machine(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rounds": rounds,
        "reps_per_round": reps,
        "train_batch_size": 64,
        "train_samples_per_rep": train.labels().len(),
        "eval_batch_size": 256,
        "eval_samples_per_rep": test.labels().len(),
        "kiln": {
            "train_samples_per_sec": kiln.0,
            "eval_samples_per_sec": kiln.1,
            "train_samples_per_sec_all": kiln_train,
            "eval_samples_per_sec_all": kiln_eval,
        },
        "burn_ops": {
            "train_samples_per_sec": burn.0,
            "eval_samples_per_sec": burn.1,
            "train_samples_per_sec_all": burn_train,
            "eval_samples_per_sec_all": burn_eval,
        },
        "pytorch": {
            "train_samples_per_sec": pytorch.0,
            "eval_samples_per_sec": pytorch.1,
            "runs": pytorch_runs,
        },
        "kiln_over_burn_ops": { "train": kiln.0 / burn.0, "eval": kiln.1 / burn.1 },
        "kiln_over_pytorch": { "train": ratio(kiln.0, pytorch.0), "eval": ratio(kiln.1, pytorch.1) },
        "burn_ops_over_pytorch": { "train": ratio(burn.0, pytorch.0), "eval": ratio(burn.1, pytorch.1) },
    });
    println!("{report}");
    Ok(())
}
