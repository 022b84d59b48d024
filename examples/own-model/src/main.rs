//! Trains the wave forecaster with kiln's trainer: AdamW, a cosine schedule with linear
//! warm-up, gradient clipping and accumulation over 2 batches, on one device or data
//! parallel over `--ranks N` threads (`--zero 1|2` shards the optimizer state).
//!
//! Run (from kiln's repository): `cargo run --release --manifest-path
//! examples/own-model/Cargo.toml -- --ranks 2`; `--help` lists the flags. Built with
//! `--features mpi`, `kiln launch --nproc-per-node 2 -- target/release/own-model` trains on
//! two processes.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::Device;
use kiln::multi::{BucketConfig, DeviceSpec, Rank, WorldSize, ZeroStage};
use kiln::recipes::distributed::run_as_launched;
use kiln::trainer::checkpoint::Checkpoint;
use kiln::trainer::{
    Data, Execution, LrSchedule, OptimizerConfig, ProcessGroupConfig, RunLabels, Steps, StopSignal,
    Trainer, TrainerConfig,
};
use own_model::{Forecaster, WindowBatcher, waves};

const HELP: &str = "own-model: trains a wave forecaster with kiln's trainer

USAGE: own-model [--ranks N] [--zero 1|2] [--epochs N] [--out DIR] [--resume]
                 [--learner | --plain-burn-train]

  --ranks N    data-parallel ranks (threads) [default: 1]
  --zero S     shard the optimizer state (1) and gradients (2) over the ranks
  --epochs N   epochs of 64 optimizer steps [default: 3]
  --out DIR    run directory for checkpoints and metrics.jsonl [default: runs/own-model]
  --resume     continue the run in --out from its latest checkpoint
  --learner    train through burn-train's Learner instead, with kiln's data-parallel
               strategy (AdamW, constant rate; --zero and --resume do not apply)
  --plain-burn-train
               the same burn-train program on one device, without kiln's strategy";

struct Args {
    ranks: usize,
    zero: Option<ZeroStage>,
    epochs: usize,
    out: PathBuf,
    resume: bool,
    learner: bool,
    plain: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        ranks: 1,
        zero: None,
        epochs: 3,
        out: PathBuf::from("runs/own-model"),
        resume: false,
        learner: false,
        plain: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--ranks" => args.ranks = value()?.parse().map_err(|e| format!("--ranks: {e}"))?,
            "--epochs" => args.epochs = value()?.parse().map_err(|e| format!("--epochs: {e}"))?,
            "--out" => args.out = PathBuf::from(value()?),
            "--resume" => args.resume = true,
            "--learner" => args.learner = true,
            "--plain-burn-train" => (args.learner, args.plain) = (true, true),
            "--zero" => {
                args.zero = match value()?.as_str() {
                    "1" => Some(ZeroStage::One),
                    "2" => Some(ZeroStage::Two),
                    other => return Err(format!("--zero: expected 1 or 2, got {other}")),
                }
            }
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}\n\n{HELP}")),
        }
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    if args.learner {
        return own_model::learner::run(args.ranks, args.epochs, &args.out, args.plain);
    }
    // 4,096 training windows, batches of 32, 2 batches per step: 64 steps per epoch. The
    // cosine spans 3 epochs whatever --epochs says, so a run can be extended on --resume.
    let schedule_steps = 3 * 4096 / (32 * 2);
    let config = TrainerConfig {
        epochs: args.epochs,
        batch_size: 32,
        lr: 3e-3,
        optimizer: OptimizerConfig::adamw(0.01),
        schedule: LrSchedule::WarmupCosine {
            warmup_steps: 20,
            total_steps: schedule_steps,
            min_lr: 3e-4,
        },
        clip_grad_norm: Some(1.0),
        accumulation_steps: NonZeroUsize::new(2).ok_or("2 is not zero")?,
        ..TrainerConfig::default()
    };
    // SIGTERM or Ctrl-C: finish the step, write a checkpoint there, stop; --resume goes on.
    StopSignal::install_handlers()?;
    let trainer = Trainer::new(
        config,
        &args.out,
        RunLabels::named("own-model", "forecaster"),
    )?
    .with_stop(StopSignal::process());
    let resume = kiln::trainer::checkpoint::load_latest(&args.out)?;
    if resume.is_some() != args.resume {
        return Err(match args.resume {
            true => format!("--resume: {} holds no checkpoint", args.out.display()),
            false => format!(
                "{} holds checkpoints of an earlier run: --resume it, or choose another --out",
                args.out.display()
            ),
        }
        .into());
    }
    let device = Device::flex().autodiff();
    // Burn's initialisers draw from the device's generator: seeded, every run starts alike.
    device.seed(trainer.config().seed);
    let timeout = Duration::from_secs(60);
    // Under `kiln launch` (or mpirun) this process is one rank of the job's MPI group.
    run_as_launched(timeout, |group| {
        let execution = match group {
            Some(collective) => Execution::Process(ProcessGroupConfig {
                device: device.clone(),
                collective,
                buckets: BucketConfig::default(),
                zero: args.zero,
            }),
            None => Execution::on_ranks(
                DeviceSpec::Cpu,
                WorldSize::new(args.ranks)?,
                timeout,
                args.zero,
            )?,
        };
        train(&trainer, &device, resume, &execution)
    })
}

/// The training call itself: the lines a user writes besides their model and data.
fn train(
    trainer: &Trainer,
    device: &Device,
    resume: Option<(PathBuf, Checkpoint)>,
    execution: &Execution,
) -> Result<(), Box<dyn std::error::Error>> {
    let (train, eval) = (waves(4096, 1), waves(512, 2));
    let (_model, report) = trainer.fit_model(
        Forecaster::new(32, device),
        Steps {
            train: &|model: &Forecaster, batch| model.kiln_step(batch),
            eval: &|model: &Forecaster, batch| model.kiln_step(batch),
        },
        Data {
            train: &train,
            eval: &eval,
            batcher: &WindowBatcher,
        },
        resume,
        execution,
    )?;
    if execution.rank() != Rank::ZERO {
        return Ok(());
    }
    let last = report.history.last().ok_or("no epoch ran")?;
    println!(
        "{{\"epochs\":{},\"steps\":{},\"train_loss\":{},\"test_loss\":{},\"test_mae\":{}}}",
        last.epoch,
        last.step,
        last.train_loss,
        last.test_loss,
        last.test_metrics.get("mae").copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
