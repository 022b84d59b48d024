//! The general trainer on a model that is not an image classifier: the own-model example's
//! wave forecaster (its own `lib.rs`), trained with AdamW, a cosine schedule with warm-up,
//! clipping and accumulation over 2 batches. Every execution mode takes the steps of one
//! device; a group whose collectives do not reduce (synchronisation removed) does not.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::Device;
use kiln::multi::data_parallel::flatten_params;
use kiln::multi::{
    BucketConfig, Collective, CollectiveConfig, Rank, ReduceOp, WorldSize, ZeroStage,
    run_in_process,
};
use kiln::trainer::report::Verbosity;
use kiln::trainer::{
    Data, Execution, FitReport, LrSchedule, OptimizerConfig, ProcessGroupConfig, RunLabels, Steps,
    StopSignal, Trainer, TrainerConfig,
};

use crate::common::max_abs_diff;

#[allow(dead_code)]
#[path = "../../examples/own-model/src/lib.rs"]
pub(crate) mod own_model;

use own_model::{Forecaster, Window, WindowBatch, WindowBatcher, waves};

/// 320 training windows in batches of 8, 2 batches per step: 20 optimizer steps per epoch.
pub(crate) fn config(epochs: usize) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size: 8,
        eval_batch_size: 48,
        lr: 1e-2,
        optimizer: OptimizerConfig::adamw(0.05),
        schedule: LrSchedule::WarmupCosine {
            warmup_steps: 5,
            total_steps: 20 * epochs as u64,
            min_lr: 1e-3,
        },
        // Small enough to clip most steps.
        clip_grad_norm: Some(0.05),
        accumulation_steps: NonZeroUsize::new(2).unwrap(),
        seed: 11,
        ..TrainerConfig::default()
    }
}

pub(crate) struct Run {
    pub(crate) params: Vec<f32>,
    pub(crate) report: FitReport,
}

/// The same initial model for every run (Burn's initialisers are not seeded).
pub(crate) fn initial_model() -> Forecaster {
    Forecaster::new(24, &Device::flex().autodiff())
}

fn fit(
    model: Forecaster,
    config: TrainerConfig,
    run_dir: &std::path::Path,
    resume: bool,
    execution: &Execution,
) -> kiln::trainer::Result<Run> {
    fit_stopping(model, config, run_dir, resume, execution, None)
}

/// [`fit`]; with `stop_at`, the training step asks the run to stop (as SIGTERM does) when it
/// reaches that micro-batch (counted over all ranks).
pub(crate) fn fit_stopping(
    model: Forecaster,
    config: TrainerConfig,
    run_dir: &std::path::Path,
    resume: bool,
    execution: &Execution,
    stop_at: Option<usize>,
) -> kiln::trainer::Result<Run> {
    let (train, eval) = (waves(320, 5), waves(96, 6));
    let stop = StopSignal::new();
    let trainer = Trainer::new(
        config,
        run_dir,
        RunLabels::named("general-test", "forecaster"),
    )?
    .with_verbosity(Verbosity::Quiet)
    .with_stop(stop.clone());
    let resume = if resume {
        kiln::trainer::checkpoint::load_latest(run_dir)?
    } else {
        None
    };
    let batches = AtomicUsize::new(0);
    let train_step = |model: &Forecaster, batch: WindowBatch| {
        if Some(batches.fetch_add(1, Ordering::SeqCst)) == stop_at {
            stop.request(15);
        }
        model.kiln_step(batch)
    };
    let eval_step = |model: &Forecaster, batch: WindowBatch| model.kiln_step(batch);
    let (model, report) = trainer.fit_model(
        model,
        Steps {
            train: &train_step,
            eval: &eval_step,
        },
        Data::<Window, WindowBatch> {
            train: &train,
            eval: &eval,
            batcher: &WindowBatcher,
        },
        resume,
        execution,
    )?;
    Ok(Run {
        params: flatten_params(&model)?,
        report,
    })
}

fn one_device(model: Forecaster) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let execution = Execution::Single(Device::flex().autodiff());
    fit(model, config(1), dir.path(), false, &execution).unwrap()
}

fn threads(model: Forecaster, zero: Option<ZeroStage>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let execution = Execution::on_ranks(
        kiln::multi::DeviceSpec::Cpu,
        WorldSize::new(2).unwrap(),
        Duration::from_secs(60),
        zero,
    )
    .unwrap();
    fit(model, config(1), dir.path(), false, &execution).unwrap()
}

/// Two ranks, each running the trainer as one process of a group made outside (as under
/// `kiln launch`), over `wrap`ped in-process collectives; rank 0's run.
fn process_group(
    model: Forecaster,
    zero: Option<ZeroStage>,
    wrap: fn(Arc<dyn Collective>) -> Arc<dyn Collective>,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let config = CollectiveConfig {
        timeout: Duration::from_secs(60),
    };
    let runs = run_in_process(WorldSize::new(2).unwrap(), config, |collective| {
        let execution = Execution::Process(ProcessGroupConfig {
            device: Device::flex().autodiff(),
            collective: wrap(collective),
            buckets: BucketConfig::default(),
            zero,
        });
        fit(
            model.clone(),
            self::config(1),
            dir.path(),
            false,
            &execution,
        )
    })
    .unwrap();
    runs.into_iter().next().unwrap()
}

fn assert_same_steps(run: &Run, reference: &Run, what: &str) {
    assert_eq!(run.report.history[0].step, 20, "{what}");
    let diff = max_abs_diff(&run.params, &reference.params);
    assert!(diff <= 1e-5, "{what}: parameters differ by {diff}");
    let (a, b) = (&run.report.history[0], &reference.report.history[0]);
    for (x, y) in [(a.train_loss, b.train_loss), (a.test_loss, b.test_loss)] {
        assert!((x - y).abs() <= 1e-5, "{what}: losses {x} vs {y}");
    }
    let (x, y) = (a.test_metrics["mae"], b.test_metrics["mae"]);
    assert!((x - y).abs() <= 1e-5, "{what}: test mae {x} vs {y}");
}

#[test]
fn every_mode_takes_the_steps_of_one_device() {
    let model = initial_model();
    let single = one_device(model.clone());
    let first = &single.report.history[0];
    assert!(
        first.test_loss.is_finite() && first.test_loss < 1.0,
        "{first:?}"
    );
    assert_eq!(first.train_metrics.len(), 1, "mae: {first:?}");
    // The clipping acts in this configuration (so the modes agree on it, not around it).
    let dir = tempfile::tempdir().unwrap();
    let unclipped = TrainerConfig {
        clip_grad_norm: None,
        ..config(1)
    };
    let execution = Execution::Single(Device::flex().autodiff());
    let unclipped = fit(model.clone(), unclipped, dir.path(), false, &execution).unwrap();
    let diff = max_abs_diff(&unclipped.params, &single.params);
    assert!(
        diff > 1e-4,
        "clipping changed the parameters by only {diff}"
    );
    for zero in [None, Some(ZeroStage::One), Some(ZeroStage::Two)] {
        let what = format!("2 threads, zero {zero:?}");
        assert_same_steps(&threads(model.clone(), zero), &single, &what);
        let what = format!("2 processes' path, zero {zero:?}");
        assert_same_steps(&process_group(model.clone(), zero, |c| c), &single, &what);
    }
}

/// The negative control: with collectives that do not reduce, the ranks train on their own
/// halves of each batch, which the comparison above must notice.
#[test]
fn without_synchronisation_the_steps_differ() {
    let model = initial_model();
    let single = one_device(model.clone());
    for zero in [None, Some(ZeroStage::One), Some(ZeroStage::Two)] {
        let run = process_group(model.clone(), zero, |c| Arc::new(NoReduce(c)));
        let diff = max_abs_diff(&run.params, &single.params);
        assert!(
            diff > 1e-3,
            "zero {zero:?}: only {diff} apart without reduction"
        );
    }
}

/// The TensorBoard scalars of `run` (two event files: before and after a resume) equal the
/// uninterrupted `reference`'s, timings aside: a loss, rate and gradient norm for each of
/// `steps` optimizer steps, and the epochs' metrics.
pub(crate) fn assert_same_curves(run: &std::path::Path, reference: &std::path::Path, steps: u64) {
    use kiln::trainer::report::tensorboard::read_scalars;
    let curves = |dir| {
        let mut scalars = read_scalars(dir).unwrap();
        // Timings (throughput, the exchange's and the bubble's share) differ run to run.
        scalars.retain(|s| !s.tag.starts_with("speed/") && !s.tag.starts_with("parallel/"));
        scalars.sort_by(|a, b| (&a.tag, a.step).cmp(&(&b.tag, b.step)));
        scalars
            .into_iter()
            .map(|s| (s.tag, s.step, s.value))
            .collect::<Vec<_>>()
    };
    let (got, want) = (curves(run), curves(reference));
    for tag in ["loss/train_step", "optimizer/lr", "optimizer/grad_norm"] {
        let n = want.iter().filter(|(t, _, _)| t == tag).count() as u64;
        assert_eq!(n, steps, "{tag}");
    }
    let epochs = want
        .iter()
        .filter(|(t, _, _)| t == "loss/validation")
        .count();
    assert_eq!(epochs, 3);
    let first = got.iter().zip(&want).position(|(g, w)| g != w);
    assert!(
        got == want,
        "curves differ: {} vs {} scalars; first difference {:?}",
        got.len(),
        want.len(),
        first.map(|i| (&got[i], &want[i]))
    );
}

#[test]
fn a_run_stopped_after_an_epoch_resumes_exactly() {
    let model = initial_model();
    let execution = Execution::Single(Device::flex().autodiff());
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = fit(
        model.clone(),
        config(3),
        whole_dir.path(),
        false,
        &execution,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The schedule spans 3 epochs: the stopped run is configured for 3 and ends after 1.
    let stopped = TrainerConfig {
        epochs: 1,
        ..config(3)
    };
    let first = fit(model.clone(), stopped, dir.path(), false, &execution).unwrap();
    assert_eq!(first.report.history.len(), 1);
    // A fresh run into the stopped run's directory would overwrite it: refused.
    let again = fit(initial_model(), config(3), dir.path(), false, &execution);
    let error = again.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("already holds checkpoints"), "{error}");
    let resumed = fit(initial_model(), config(3), dir.path(), true, &execution).unwrap();
    assert_same_curves(dir.path(), whole_dir.path(), 60);
    assert_eq!(resumed.report.resumed_from_epoch, 1);
    assert_eq!(resumed.params, whole.params, "bit for bit");
    assert_eq!(resumed.report.history.len(), 3);
    for (r, w) in resumed.report.history.iter().zip(&whole.report.history) {
        assert_eq!(r.step, w.step);
        // The first epoch's row went through the checkpoint's JSON, which keeps every bit
        // of an f64 (serde_json's `float_roundtrip`).
        for (x, y) in [(r.train_loss, w.train_loss), (r.test_loss, w.test_loss)] {
            assert!(x == y, "epoch {}: {x} vs {y}", r.epoch);
        }
    }
}

#[test]
fn a_failing_step_or_a_bad_loss_is_an_error_naming_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = (waves(32, 5), waves(8, 6));
    let trainer = Trainer::new(config(1), dir.path(), RunLabels::named("t", "forecaster"))
        .unwrap()
        .with_verbosity(Verbosity::Quiet);
    let data = Data::<Window, WindowBatch> {
        train: &train,
        eval: &eval,
        batcher: &WindowBatcher,
    };
    let execution = Execution::Single(Device::flex().autodiff());
    let good = |model: &Forecaster, batch: WindowBatch| model.kiln_step(batch);
    let failing = |_: &Forecaster, _: WindowBatch| -> kiln::trainer::StepResult<_> {
        Err("no labels in this batch".into())
    };
    let steps = Steps {
        train: &failing,
        eval: &good,
    };
    let error = trainer
        .fit_model(initial_model(), steps, data, None, &execution)
        .unwrap_err()
        .to_string();
    assert!(error.contains("training step failed: no labels"), "{error}");
    // `kiln runs` sees the failure and its reason.
    let summary = kiln::trainer::report::runs::summarise(dir.path());
    assert_eq!(
        summary.status,
        Some(kiln::trainer::report::run_state::RunStatus::Failed)
    );
    let recorded = summary.error.unwrap_or_default();
    assert!(recorded.contains("no labels"), "{recorded}");
    assert_eq!((summary.epochs_done, summary.planned_epochs), (0, Some(1)));
    let per_item = |model: &Forecaster, batch: WindowBatch| {
        let n = batch.targets.dims()[0];
        let error = model.forward(batch.windows) - batch.targets;
        Ok(kiln::trainer::StepOutput::new(
            error.powi_scalar(2).reshape([n]),
            n,
        ))
    };
    let steps = Steps {
        train: &per_item,
        eval: &good,
    };
    let error = trainer
        .fit_model(initial_model(), steps, data, None, &execution)
        .unwrap_err()
        .to_string();
    assert!(error.contains("must have one element"), "{error}");
    let empty = waves(0, 7);
    let no_eval = Data::<Window, WindowBatch> {
        eval: &empty,
        ..data
    };
    let steps = Steps {
        train: &good,
        eval: &good,
    };
    let error = trainer
        .fit_model(initial_model(), steps, no_eval, None, &execution)
        .unwrap_err()
        .to_string();
    assert!(error.contains("evaluation data is empty"), "{error}");
    assert!(
        kiln::trainer::checkpoint::latest_checkpoint(dir.path())
            .unwrap()
            .is_none(),
        "nothing was written"
    );
}

/// A collective whose reductions do nothing: each rank keeps its own values.
pub(crate) struct NoReduce(pub(crate) Arc<dyn Collective>);

impl Collective for NoReduce {
    fn rank(&self) -> Rank {
        self.0.rank()
    }
    fn world_size(&self) -> WorldSize {
        self.0.world_size()
    }
    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> kiln::multi::Result<()> {
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> kiln::multi::Result<()> {
        self.0.broadcast(buf, root)
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> kiln::multi::Result<()> {
        self.0.all_gather(shard, out)
    }
    fn reduce_scatter(
        &self,
        buf: &[f32],
        shard: &mut [f32],
        _: ReduceOp,
    ) -> kiln::multi::Result<()> {
        let range = kiln::multi::shard_range(buf.len(), self.world_size(), self.rank());
        shard.copy_from_slice(&buf[range]);
        Ok(())
    }
    fn barrier(&self) -> kiln::multi::Result<()> {
        self.0.barrier()
    }
}

/// Where each training step ran: on which thread of the kernels' pool, if on one.
fn step_threads(execution: &Execution) -> Vec<Option<usize>> {
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(
        config(1),
        dir.path(),
        RunLabels::named("pool", "forecaster"),
    )
    .unwrap()
    .with_verbosity(Verbosity::Quiet);
    let seen = Mutex::new(Vec::new());
    let train_step = |model: &Forecaster, batch: WindowBatch| {
        seen.lock().unwrap().push(rayon::current_thread_index());
        model.kiln_step(batch)
    };
    let eval_step = |model: &Forecaster, batch: WindowBatch| model.kiln_step(batch);
    let (train, eval) = (waves(64, 5), waves(16, 6));
    let steps = Steps {
        train: &train_step,
        eval: &eval_step,
    };
    let data = Data::<Window, WindowBatch> {
        train: &train,
        eval: &eval,
        batcher: &WindowBatcher,
    };
    let (_, report) = trainer
        .fit_model(initial_model(), steps, data, None, execution)
        .unwrap();
    assert_eq!(report.history.len(), 1);
    seen.into_inner().unwrap()
}

/// One rank alone on the CPU runs its steps on the first thread of the kernels' pool (its
/// parallel loops then start on that thread, with no hand-off to the pool each), always that
/// one (Burn's batch-norm running statistics are kept per thread); the ranks of a group keep
/// their own threads, where a collective waiting for the other ranks holds no pool thread.
#[test]
fn one_device_steps_on_the_kernels_pool_and_ranks_on_their_own_threads() {
    let single = step_threads(&Execution::Single(Device::flex().autodiff()));
    assert!(
        !single.is_empty() && single.iter().all(|&p| p == Some(0)),
        "{single:?}"
    );
    let ranks = Execution::on_ranks(
        kiln::multi::DeviceSpec::Cpu,
        WorldSize::new(2).unwrap(),
        Duration::from_secs(60),
        None,
    )
    .unwrap();
    let grouped = step_threads(&ranks);
    assert!(
        !grouped.is_empty() && grouped.iter().all(Option::is_none),
        "{grouped:?}"
    );
}
