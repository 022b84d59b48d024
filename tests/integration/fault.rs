//! Stopping and resuming inside an epoch: a run asked to stop (as SIGTERM does) at a chosen
//! micro-batch, or checkpointing every few steps, resumes to exactly the uninterrupted run:
//! the same parameters bit for bit, the same epoch metrics and TensorBoard curves; on one
//! device, on 2 data-parallel ranks and under ZeRO-2. Through the CLI, SIGTERM and Ctrl-C give
//! the conventional exit status, a checkpoint and a run that resumes.

use std::time::Duration;

use burn::tensor::Device;
use kiln::multi::{WorldSize, ZeroStage};
use kiln::trainer::{Execution, FitReport, TrainError, TrainerConfig};

use crate::common::max_abs_diff;
use crate::general::own_model::Forecaster;
use crate::general::{assert_same_curves, config, fit_stopping, initial_model};

/// Trains the forecaster from `model` (see [`fit_stopping`]): its parameters and report.
fn fit(
    model: &Forecaster,
    config: TrainerConfig,
    run_dir: &std::path::Path,
    resume: bool,
    execution: &Execution,
    stop_at: Option<usize>,
) -> kiln::trainer::Result<(Vec<f32>, FitReport)> {
    let run = fit_stopping(model.clone(), config, run_dir, resume, execution, stop_at)?;
    Ok((run.params, run.report))
}

fn executions() -> Vec<(&'static str, Execution)> {
    let ranks = |zero| {
        Execution::on_ranks(
            kiln::multi::DeviceSpec::Cpu,
            WorldSize::new(2).unwrap(),
            Duration::from_secs(60),
            zero,
        )
        .unwrap()
    };
    vec![
        ("one device", Execution::Single(Device::flex().autodiff())),
        ("2 ranks", ranks(None)),
        ("2 ranks, ZeRO-2", ranks(Some(ZeroStage::Two))),
    ]
}

#[test]
fn a_run_stopped_inside_an_epoch_resumes_to_the_uninterrupted_run() {
    for (name, execution) in executions() {
        // Burn's initialisers are not seeded: one initial model for both runs.
        let start = initial_model();
        let whole_dir = tempfile::tempdir().unwrap();
        let (whole, whole_report) =
            fit(&start, config(3), whole_dir.path(), false, &execution, None)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        // 20 steps of 2 micro-batches per epoch: micro-batch 45 (of all ranks' 2 x 40 per
        // epoch on 2 ranks, or 40 on one) falls in the second epoch or the first.
        let dir = tempfile::tempdir().unwrap();
        let error = fit(&start, config(3), dir.path(), false, &execution, Some(45)).unwrap_err();
        let TrainError::Stopped {
            signal,
            step,
            checkpoint,
        } = &error
        else {
            panic!("{name}: {error}");
        };
        assert_eq!(*signal, 15, "{name}");
        let checkpoint = checkpoint.clone().unwrap();
        assert!(checkpoint.exists(), "{name}: {}", checkpoint.display());
        assert!(step % 20 != 0, "{name}: step {step} is inside an epoch");
        let summary = kiln::trainer::report::runs::summarise(dir.path());
        let stopped = kiln::trainer::report::run_state::RunStatus::Stopped;
        assert_eq!(summary.status, Some(stopped), "{name}");
        // The resumed run's own initial model is replaced by the checkpoint's.
        let (resumed, report) = fit(
            &initial_model(),
            config(3),
            dir.path(),
            true,
            &execution,
            None,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff = max_abs_diff(&resumed, &whole);
        assert!(
            resumed == whole,
            "{name}: parameters differ by up to {diff}"
        );
        assert_eq!(report.history.len(), 3, "{name}");
        for (r, w) in report.history.iter().zip(&whole_report.history) {
            let same = (r.train_loss, r.test_loss, &r.train_metrics, &r.test_metrics)
                == (w.train_loss, w.test_loss, &w.train_metrics, &w.test_metrics);
            assert!(same, "{name}: epoch {}: {r:?} vs {w:?}", r.epoch);
        }
        assert_same_curves(dir.path(), whole_dir.path(), 60);
    }
}

#[test]
fn checkpoints_every_n_steps_keep_the_latest_and_resume_exactly() {
    let execution = Execution::Single(Device::flex().autodiff());
    let every = TrainerConfig {
        checkpoint_every: std::num::NonZeroU64::new(7),
        ..config(3)
    };
    let start = initial_model();
    let whole_dir = tempfile::tempdir().unwrap();
    let (whole, _) = fit(&start, config(3), whole_dir.path(), false, &execution, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Stopped in epoch 2 after micro-batch 60 (step 31): checkpoints at steps 7, 14, 20
    // (the epoch), 21, 28, then the stop's at 31; the mid-epoch ones before it are gone.
    let error = fit(
        &start,
        every.clone(),
        dir.path(),
        false,
        &execution,
        Some(60),
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::Stopped { step: 31, .. }),
        "{error}"
    );
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["epoch-0001-step-0000000031.ckpt", "epoch-0001.ckpt"]
    );
    let (resumed, _) = fit(&initial_model(), every, dir.path(), true, &execution, None).unwrap();
    let diff = max_abs_diff(&resumed, &whole);
    assert!(resumed == whole, "parameters differ by up to {diff}");
    let files = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(files, 3, "the epochs' checkpoints only");
}

/// `kiln train` told to stop while it trains: it ends after the step in progress with the
/// conventional status, a checkpoint there and a run marked stopped; `--resume` then ends with
/// the uninterrupted run's metrics, bit for bit.
#[test]
fn sigterm_and_ctrl_c_stop_kiln_train_at_a_checkpoint_that_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--limit", "512", "--epochs", "12", "--ranks", "2", "-q"];
    let whole = dir.path().join("whole");
    let whole_arg = whole.to_str().unwrap();
    crate::common::kiln_ok(&[&["train", "cnn-mnist", "--out", whole_arg][..], &flags].concat());
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let run = dir.path().join(format!("stopped-{signal}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "cnn-mnist", "--checkpoint-every", "3", "--out"])
            .arg(&run)
            .args(flags)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // run.json appears once training starts (the handlers are installed before).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !run.join("run.json").exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling a child process this test started and still owns.
        unsafe { libc::kill(child.id() as i32, signal) };
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(status), "{stderr}");
        assert!(stderr.contains("continue with --resume"), "{stderr}");
        let state = std::fs::read_to_string(run.join("run.json")).unwrap();
        assert!(state.contains("\"status\": \"stopped\""), "{state}");
        let run_arg = run.to_str().unwrap();
        let args = [
            &["train", "cnn-mnist", "--resume", "--out", run_arg][..],
            &flags,
        ]
        .concat();
        crate::common::kiln_ok(&args);
        let metrics = |dir: &std::path::Path| std::fs::read_to_string(dir.join("metrics.jsonl"));
        let strip = |text: String| -> Vec<serde_json::Value> {
            text.lines()
                .map(|l| {
                    let mut m: serde_json::Value = serde_json::from_str(l).unwrap();
                    for timing in ["samples_per_sec", "train_seconds", "exchange_fraction"] {
                        m.as_object_mut().unwrap().remove(timing);
                    }
                    m
                })
                .collect()
        };
        let (got, want) = (
            strip(metrics(&run).unwrap()),
            strip(metrics(&whole).unwrap()),
        );
        assert_eq!(got, want, "signal {signal}");
    }
}

/// A forecaster with a BatchNorm: its running statistics are module state outside the
/// optimizer, updated by every training forward.
#[derive(burn::module::Module, Debug)]
struct NormedForecaster {
    fc: burn::nn::Linear,
    bn: burn::nn::BatchNorm,
    out: burn::nn::Linear,
}

impl NormedForecaster {
    fn step(
        &self,
        batch: crate::general::own_model::WindowBatch,
    ) -> kiln::trainer::StepResult<kiln::trainer::StepOutput> {
        let n = batch.targets.dims()[0];
        let hidden =
            burn::tensor::activation::relu(self.bn.forward(self.fc.forward(batch.windows)));
        let error = self.out.forward(hidden) - batch.targets;
        Ok(kiln::trainer::StepOutput::new(
            error.powi_scalar(2).mean(),
            n,
        ))
    }
}

#[test]
fn running_statistics_survive_a_mid_epoch_checkpoint() {
    use crate::general::own_model::{Window, WindowBatch, WindowBatcher, waves};
    use kiln::trainer::{Data, RunLabels, Steps, StopSignal, Trainer};
    // A new model for every run (clones would share their running statistics), each loaded
    // with the same initial record: the backend's random generator is shared with the tests
    // running beside this one, so seeding it would not make two initialisations equal.
    use burn::module::Module;
    let fresh = || {
        let device = Device::flex().autodiff();
        NormedForecaster {
            fc: burn::nn::LinearConfig::new(crate::general::own_model::WINDOW, 8).init(&device),
            bn: burn::nn::BatchNormConfig::new(8).init(&device),
            out: burn::nn::LinearConfig::new(8, 1).init(&device),
        }
    };
    let initial = fresh().into_record();
    let start = || fresh().load_record(initial.clone());
    let (train, eval) = (waves(320, 5), waves(96, 6));
    let fit = |dir: &std::path::Path, resume: bool, stop_at: Option<usize>| {
        let stop = StopSignal::new();
        let trainer = Trainer::new(config(2), dir, RunLabels::named("bn-test", "normed"))?
            .with_verbosity(kiln::trainer::report::Verbosity::Quiet)
            .with_stop(stop.clone());
        let batches = std::sync::atomic::AtomicUsize::new(0);
        let train_step = |m: &NormedForecaster, b: WindowBatch| {
            let seen = batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if Some(seen) == stop_at {
                stop.request(15);
            }
            m.step(b)
        };
        let eval_step = |m: &NormedForecaster, b: WindowBatch| m.step(b);
        let resume = if resume {
            kiln::trainer::checkpoint::load_latest(dir)?
        } else {
            None
        };
        let data = Data::<Window, WindowBatch> {
            train: &train,
            eval: &eval,
            batcher: &WindowBatcher,
        };
        let steps = Steps {
            train: &train_step,
            eval: &eval_step,
        };
        let execution = Execution::Single(Device::flex().autodiff());
        trainer.fit_model(start(), steps, data, resume, &execution)
    };
    let whole_dir = tempfile::tempdir().unwrap();
    let (_, whole) = fit(whole_dir.path(), false, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Micro-batch 13 of 40 in the first epoch: step 7 of 20.
    let error = fit(dir.path(), false, Some(13)).unwrap_err();
    assert!(
        matches!(error, TrainError::Stopped { step: 7, .. }),
        "{error}"
    );
    let (_, resumed) = fit(dir.path(), true, None).unwrap();
    // The evaluation runs on the running statistics: one update behind, it would differ.
    let losses = |r: &FitReport| r.history.iter().map(|m| m.test_loss).collect::<Vec<_>>();
    assert_eq!(losses(&resumed), losses(&whole));
}
