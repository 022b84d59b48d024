//! SimpleCNN throughput benchmark: training (batch 64, SGD momentum, through `Trainer::fit`,
//! evaluation excluded) and evaluation (batch 256, through `evaluate`), on the embedded MNIST
//! subset. One warm-up, then the median of several repetitions. Prints one JSON object.
//!
//! When `python3` with `torch` is installed, the same workloads run in PyTorch in the same
//! process tree right after (benches/simple_cnn_pytorch.py, 2 threads), and the ratios are
//! printed; set `KILN_BENCH_NO_PYTORCH=1` to skip that.
//!
//! Run: `cargo bench --bench simple_cnn` (options: `-- --reps N --train-samples N`).

mod common;

use std::num::NonZeroUsize;
use std::time::Instant;

use burn::tensor::Device;
use common::{arg, median, run_pytorch};
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::MnistSplit;
use kiln::trainer::report::Verbosity;
use kiln::trainer::{Execution, RunLabels, TrainData, Trainer, TrainerConfig, evaluate};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let reps = arg("--reps", 5).max(1);
    let train_samples = arg("--train-samples", 1920);
    let train = MnistSource::Embedded
        .load(MnistSplit::Train)?
        .take(train_samples);
    let test = MnistSource::Embedded.load(MnistSplit::Test)?;
    let device = Device::flex().autodiff();

    // Training: one epoch over `train_samples` per repetition (the first one is warm-up).
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
            train: &train,
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
            &test,
            NonZeroUsize::new(256).expect("256 is not zero"),
            &device,
        );
        if rep > 0 {
            eval_rates.push(metrics.samples as f64 / start.elapsed().as_secs_f64());
        }
    }

    let kiln_train = median(train_rates.clone());
    let kiln_eval = median(eval_rates.clone());
    let pytorch = run_pytorch("simple_cnn_pytorch.py", reps, train_samples);
    let ratios = pytorch.as_ref().map(|p| {
        json!({
            "train": kiln_train / p["train_samples_per_sec"].as_f64().unwrap_or(f64::NAN),
            "eval": kiln_eval / p["eval_samples_per_sec"].as_f64().unwrap_or(f64::NAN),
        })
    });
    let report = json!({
        "benchmark": "simple_cnn",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "reps": reps,
        "train_batch_size": 64,
        "train_samples_per_rep": train.labels().len(),
        "eval_batch_size": 256,
        "eval_samples_per_rep": test.labels().len(),
        "kiln": {
            "train_samples_per_sec": kiln_train,
            "eval_samples_per_sec": kiln_eval,
            "train_samples_per_sec_all": train_rates,
            "eval_samples_per_sec_all": eval_rates,
        },
        "pytorch": pytorch,
        "kiln_over_pytorch": ratios,
    });
    println!("{report}");
    Ok(())
}
