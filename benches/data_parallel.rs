//! Data-parallel benchmark: in-process all-reduce bandwidth between 2 ranks (1, 16, 64 MiB,
//! with a 64 MiB memcpy as the physical reference), and SimpleCNN training throughput through
//! `Trainer::fit` with 1 rank (batch 64), 2 ranks (global batch 64 = 2 x 32) and 2 ranks
//! (global batch 128 = 2 x 64, the shape of PyTorch's DDP reference), and 2 ranks x 32 with
//! the optimizer state sharded (ZeRO-1, ZeRO-2) against plain data parallelism. Configurations are
//! interleaved repetition by repetition so that machine noise hits them alike; medians are
//! reported. Prints one JSON object.
//!
//! When `python3` with `torch` is installed, `benches/data_parallel_pytorch.py` runs the same
//! measurements with PyTorch DDP (gloo, 2 processes x 1 thread) right after, and the ratios
//! are printed; set `KILN_BENCH_NO_PYTORCH=1` to skip that.
//!
//! Run: `cargo bench --bench data_parallel` (options: `-- --reps N --train-samples N`).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use common::{arg, median, run_pytorch};
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::multi::{
    BucketConfig, CollectiveConfig, MultiError, ReduceOp, Transport, WorldSize, ZeroStage,
    run_in_process,
};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::{MnistDataset, MnistSplit};
use kiln::trainer::report::Verbosity;
use kiln::trainer::{DataParallelConfig, Execution, RunLabels, TrainData, Trainer, TrainerConfig};
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

/// Median seconds of one all-reduce (sum) of `bytes` between 2 ranks, as rank 0 sees it.
fn all_reduce_seconds(bytes: usize, reps: usize) -> anyhow::Result<f64> {
    let config = CollectiveConfig {
        timeout: Duration::from_secs(60),
    };
    let times = run_in_process(WorldSize::new(2)?, config, |c| {
        let mut buf = vec![c.rank().index() as f32 + 1.0; bytes / 4];
        let mut times = Vec::new();
        for rep in 0..=reps {
            c.barrier()?;
            let start = Instant::now();
            c.all_reduce(&mut buf, ReduceOp::Sum)?;
            if rep > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok::<_, MultiError>(times)
    })?;
    Ok(median(times[0].clone()))
}

fn memcpy_seconds(bytes: usize, reps: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    let mut times = Vec::new();
    for rep in 0..=reps {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        if rep > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    median(times)
}

/// Training samples per second of one epoch over `train` with `ranks` ranks, a global batch of
/// `batch_size`, and the optimizer state sharded with `zero`.
fn train_rate(
    train: &MnistDataset,
    test: &MnistDataset,
    (ranks, batch_size, zero): (usize, usize, Option<ZeroStage>),
    seed: u64,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let config = TrainerConfig {
        epochs: 1,
        batch_size,
        ..TrainerConfig::default()
    };
    let labels = RunLabels {
        recipe: "bench".into(),
        model: "simple-cnn".into(),
        quantization: None,
        options: Default::default(),
    };
    let trainer = Trainer::new(config, dir.path(), labels)?.with_verbosity(Verbosity::Quiet);
    let device = Device::flex().autodiff();
    let model = SimpleCnnConfig::new().init(&device, seed);
    let execution = if ranks == 1 {
        Execution::Single(device)
    } else {
        Execution::DataParallel(DataParallelConfig {
            devices: vec![device; ranks],
            collective: CollectiveConfig::default(),
            transport: Transport::SharedMemory,
            buckets: BucketConfig::default(),
            zero,
        })
    };
    let data = TrainData { train, test };
    let (_, report) = trainer.fit(model, SimpleCnn::forward, data, None, &execution)?;
    Ok(report.samples_per_sec())
}

fn main() -> anyhow::Result<()> {
    // The allocator setting `kiln train` runs with (large buffers reused, not re-faulted).
    kiln::kernels::malloc::keep_large_buffers(true);
    let reps = arg("--reps", 5).max(1);
    let train_samples = arg("--train-samples", 1920);

    let mut all_reduce = Vec::new();
    for mib in [1, 16, 64] {
        let seconds = all_reduce_seconds(mib * MIB, reps * 4)?;
        all_reduce.push(json!({
            "mib": mib,
            "median_ms": seconds * 1e3,
            "gb_per_sec": (mib * MIB) as f64 / seconds / 1e9,
        }));
    }
    let memcpy = memcpy_seconds(64 * MIB, reps * 4);

    let train = MnistSource::Embedded
        .load(MnistSplit::Train)?
        .take(train_samples);
    let test = MnistSource::Embedded.load(MnistSplit::Test)?.take(256);
    let configs = [
        (1usize, 64usize, None),
        (2, 64, None),
        (2, 128, None),
        (2, 64, Some(ZeroStage::One)),
        (2, 64, Some(ZeroStage::Two)),
    ];
    let rates: Vec<Mutex<Vec<f64>>> = configs.iter().map(|_| Mutex::new(Vec::new())).collect();
    for rep in 0..=reps {
        for (k, &config) in configs.iter().enumerate() {
            let rate = train_rate(&train, &test, config, rep as u64)?;
            if rep > 0 {
                rates[k].lock().expect("not poisoned").push(rate);
            }
        }
    }
    let training: Vec<Value> = configs
        .iter()
        .zip(&rates)
        .map(|(&(ranks, batch, zero), r)| {
            let all = r.lock().expect("not poisoned").clone();
            json!({
                "ranks": ranks,
                "global_batch_size": batch,
                "zero_stage": zero.map(ZeroStage::number),
                "samples_per_sec": median(all.clone()),
                "samples_per_sec_all": all,
            })
        })
        .collect();
    let rate_of = |k: usize| training[k]["samples_per_sec"].as_f64().unwrap_or(f64::NAN);

    let pytorch = run_pytorch("data_parallel_pytorch.py", reps, train_samples);
    let ratios = pytorch.as_ref().map(|p| {
        let gloo = |mib: u64| {
            p["all_reduce"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["mib"] == mib))
                .and_then(|e| e["gb_per_sec"].as_f64())
                .unwrap_or(f64::NAN)
        };
        json!({
            "all_reduce_64mib_over_gloo": all_reduce[2]["gb_per_sec"].as_f64().unwrap_or(f64::NAN) / gloo(64),
            "train_2x64_over_ddp_2x64": rate_of(2) / p["ddp_samples_per_sec"].as_f64().unwrap_or(f64::NAN),
        })
    });
    let report = json!({
        "benchmark": "data_parallel",
        "machine": common::machine(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "reps": reps,
        "all_reduce_2_ranks": all_reduce,
        "memcpy_64mib_gb_per_sec": (64 * MIB) as f64 / memcpy / 1e9,
        "train_samples_per_rep": train.labels().len(),
        "training": training,
        "train_2_ranks_over_1": {
            "same_global_batch_64": rate_of(1) / rate_of(0),
            "global_batch_128_over_1x64": rate_of(2) / rate_of(0),
        },
        "zero_over_plain_data_parallel_2x32": {
            "zero_1": rate_of(3) / rate_of(1),
            "zero_2": rate_of(4) / rate_of(1),
        },
        "pytorch": pytorch,
        "kiln_over_pytorch": ratios,
    });
    println!("{report}");
    Ok(())
}
