//! The GPT recipe: kiln's GPT against PyTorch 2.15 (fixtures and their generator in
//! tests/data/gpt, the twin model in benches/gpt_pytorch.py), `kiln train gpt` and
//! `kiln generate` end to end, and their errors.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use burn::data::dataset::InMemDataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::models::gpt::{Gpt, GptConfig, GptStage};
use kiln::models::load_weights;
use kiln::multi::pipeline::{
    Activation, ModuleStage, PipelineConfig, PipelineSchedule, PipelineStage, Targets,
};
use kiln::multi::{Collective, CollectiveConfig, Transport, WorldSize, ZeroStage};
use kiln::recipes::gpt::tensor_parallel::TensorParallelGpt;
use kiln::trainer::data::{ByteCorpus, TokenBatch, TokenBatcher, TokenWindow};
use kiln::trainer::report::Verbosity;
use kiln::trainer::{
    Data, Execution, LrSchedule, OptimizerConfig, PipelineSplit, RunLabels, StepOutput, StepResult,
    Steps, StopSignal, TensorParallelSplit, TensorParallelSteps, TrainError, Trainer,
    TrainerConfig,
};

use crate::common::{
    assert_clean_failure, kiln, kiln_ok, last_json, max_abs_diff, npy, repo, small_text,
    tiny_gpt_args,
};
use crate::general::NoReduce;

const TOLERANCE: f32 = 1e-4;

fn gpt_fixture(name: &str) -> std::path::PathBuf {
    repo("tests/data/gpt").join(name)
}

/// The fixtures' shape: 2 layers, 2 heads, 32 wide, 16 tokens of context, bytes.
fn fixture_config(tied_head: bool) -> GptConfig {
    GptConfig {
        vocab_size: 256,
        block_size: 16,
        layers: 2,
        heads: 2,
        embed: 32,
        tied_head,
    }
}

/// The fixture model with PyTorch's weights from `file`.
fn pytorch_model(file: &str, tied: bool, device: &Device) -> Gpt {
    let mut model = fixture_config(tied).init(device, 99).unwrap();
    let report = load_weights(&mut model, &gpt_fixture(file)).unwrap();
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    model
}

/// The 4 windows of 17 bytes the fixtures were made from.
fn fixture_windows() -> Vec<TokenWindow> {
    let input = npy(&gpt_fixture("input.npy"));
    assert_eq!(input.shape, vec![4, 17]);
    input
        .values
        .chunks(17)
        .map(|w| TokenWindow {
            tokens: w.iter().map(|&b| b as u32).collect(),
        })
        .collect()
}

/// Every float parameter of `model`, in visiting order.
fn parameters(model: &Gpt) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().try_to_vec::<f32>().unwrap();
            self.0.extend(values);
        }
    }
    let mut flatten = Flatten(Vec::new());
    model.visit(&mut flatten);
    flatten.0
}

#[test]
fn pytorch_weights_give_pytorch_logits_tied_and_untied() {
    let device = Device::flex();
    let windows = fixture_windows();
    let inputs: Vec<i64> = windows
        .iter()
        .flat_map(|w| w.tokens[..16].iter().map(|&t| i64::from(t)))
        .collect();
    for (name, tied) in [("tied", true), ("untied", false)] {
        let model = pytorch_model(&format!("gpt_{name}.safetensors"), tied, &device);
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(inputs.clone(), [4, 16]), &device);
        let logits = model
            .forward(tokens)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let expected = npy(&gpt_fixture(&format!("logits_{name}.npy")));
        assert_eq!(expected.shape, vec![4, 16, 256]);
        let diff = max_abs_diff(&logits, &expected.values);
        assert!(diff < TOLERANCE, "{name}: max abs diff {diff}");
    }
}

#[test]
fn three_adamw_steps_with_clipping_match_pytorch() {
    let device = Device::flex().autodiff();
    let model = pytorch_model("gpt_tied.safetensors", true, &device);
    let windows = InMemDataset::new(fixture_windows());
    // One batch of all 4 windows per epoch: 3 epochs are PyTorch's 3 steps on that batch.
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 4,
        eval_batch_size: 4,
        lr: 3e-3,
        optimizer: OptimizerConfig::adamw(0.1),
        schedule: LrSchedule::Constant,
        clip_grad_norm: Some(1.0),
        ..TrainerConfig::default()
    };
    let run = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(config, run.path(), RunLabels::named("parity", "gpt"))
        .unwrap()
        .with_verbosity(Verbosity::Quiet);
    let step = |model: &Gpt, batch: TokenBatch| -> StepResult<StepOutput> {
        let [b, t] = batch.targets.dims();
        Ok(StepOutput::new(
            model.loss(batch.inputs, batch.targets),
            b * t,
        ))
    };
    let (model, report) = trainer
        .fit_model(
            model,
            Steps {
                train: &step,
                eval: &step,
            },
            Data {
                train: &windows,
                eval: &windows,
                batcher: &TokenBatcher,
            },
            None,
            &Execution::Single(device.clone()),
        )
        .unwrap();
    let losses: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gpt_fixture("losses.json")).unwrap())
            .unwrap();
    for (epoch, expected) in report
        .history
        .iter()
        .zip(losses["losses"].as_array().unwrap())
    {
        let expected = expected.as_f64().unwrap();
        assert!(
            (epoch.train_loss - expected).abs() < 1e-4,
            "loss {} vs {expected}",
            epoch.train_loss
        );
    }
    let after = pytorch_model("tied_after_steps.safetensors", true, &Device::flex());
    let diff = max_abs_diff(&parameters(&model.valid()), &parameters(&after));
    assert!(
        diff < TOLERANCE,
        "parameters after 3 steps differ by {diff}"
    );
    // The steps moved the parameters (by about 3 x lr) far more than the tolerance.
    let before = pytorch_model("gpt_tied.safetensors", true, &Device::flex());
    let moved = max_abs_diff(&parameters(&before), &parameters(&after));
    assert!(
        moved > 50.0 * TOLERANCE,
        "the steps moved the parameters by {moved} only"
    );
}

/// A small text (the first 20 kB of the shipped corpus) in `dir`.
/// `kiln train gpt` with a tiny model on `data` for `epochs`.
fn train_tiny(
    data: &std::path::Path,
    out: &std::path::Path,
    epochs: &str,
    extra: &[&str],
) -> serde_json::Value {
    let args = tiny_gpt_args(data, out, "1", epochs, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    last_json(&kiln_ok(&args))
}

#[test]
fn train_gpt_learns_resumes_and_generates_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_text(dir.path());
    let run = dir.path().join("run");
    let report = train_tiny(&data, &run, "2", &[]);
    assert_eq!(report["recipe"], "gpt");
    assert_eq!(report["epochs"], 2);
    let first = report["history"][0]["test_loss"].as_f64().unwrap();
    let last = report["val_loss"].as_f64().unwrap();
    // Uniform over 256 bytes is ln 256 = 5.55 nats; two epochs learn the letters.
    assert!(
        last < first && last < 3.5,
        "validation loss {first} -> {last}"
    );
    let bpb = report["val_bits_per_byte"].as_f64().unwrap();
    assert!((bpb - last / std::f64::consts::LN_2).abs() < 1e-9);

    // Two data-parallel ranks take the steps of one device (20 steps).
    let twenty = ["--limit", "320"];
    let one = train_tiny(&data, &dir.path().join("one"), "1", &twenty);
    let ranks = train_tiny(
        &data,
        &dir.path().join("ranks"),
        "1",
        &[&twenty[..], &["--ranks", "2"]].concat(),
    );
    assert_eq!(ranks["steps"], 20);
    let diff = (ranks["val_loss"].as_f64().unwrap() - one["val_loss"].as_f64().unwrap()).abs();
    assert!(diff < 1e-5, "--ranks 2 differs from one device by {diff}");

    // Resuming a 1-epoch run for a second epoch equals the 2-epoch run (at a constant rate:
    // a resumed run keeps the cosine it started with, which ended with its first epoch).
    let constant = ["--lr-schedule", "constant"];
    let whole = train_tiny(&data, &dir.path().join("whole"), "2", &constant);
    let short = dir.path().join("short");
    train_tiny(&data, &short, "1", &constant);
    let resumed = last_json(&kiln_ok(&[
        "train",
        "gpt",
        "--resume",
        short.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
        "--json",
    ]));
    assert_eq!(resumed["resumed_from_epoch"], 1);
    assert_eq!(resumed["val_loss"], whole["val_loss"]);

    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            "ROMEO:",
            "--tokens",
            "40",
            "--json",
        ];
        args.extend_from_slice(extra);
        last_json(&kiln_ok(&args))
    };
    let text = generate(&[]);
    assert_eq!(text["tokens"], 40);
    assert_eq!(
        generate(&[])["text"],
        text["text"],
        "the same seed gives the same text"
    );
    assert_eq!(
        generate(&["--no-cache"])["text"],
        text["text"],
        "the cache changes nothing"
    );
    assert_ne!(generate(&["--seed", "7"])["text"], text["text"]);
    // Without --json the prompt and the text stream to stdout.
    let plain = kiln_ok(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--tokens",
        "40",
    ]);
    let stdout = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(
        stdout.trim_end_matches('\n'),
        format!("ROMEO:{}", text["text"].as_str().unwrap())
    );
}

#[test]
fn bad_gpt_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_text(dir.path());
    let out = dir.path().join("bad");
    let data = data.to_str().unwrap();
    assert_clean_failure(
        &kiln(&[
            "train",
            "gpt",
            "--data",
            data,
            "--heads",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]),
        &["--heads", "does not divide into 3 heads"],
    );
    assert!(!out.exists(), "a refused run leaves no directory");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    assert_clean_failure(
        &kiln(&[
            "train",
            "gpt",
            "--data",
            short.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
        &["short.txt", "--block-size"],
    );
    assert_clean_failure(
        &kiln(&[
            "train",
            "gpt",
            "--data",
            "/no/such.txt",
            "--out",
            out.to_str().unwrap(),
        ]),
        &["/no/such.txt"],
    );
    let run = dir.path().join("run");
    train_tiny(std::path::Path::new(data), &run, "1", &["--limit", "16"]);
    let run = run.to_str().unwrap();
    assert_clean_failure(
        &kiln(&["generate", "--checkpoint", run, "--prompt", ""]),
        &["--prompt", "empty"],
    );
    assert_clean_failure(
        &kiln(&["generate", "--checkpoint", run, "--temperature=-1"]),
        &["--temperature"],
    );
    assert_clean_failure(
        &kiln(&["eval", "--checkpoint", run]),
        &["GPT", "kiln generate"],
    );
    assert_clean_failure(
        &kiln(&[
            "generate",
            "--checkpoint",
            dir.path().join("none").to_str().unwrap(),
        ]),
        &["none"],
    );
}

/// How [`twenty_steps`] trains.
enum Mode<'a> {
    Single,
    /// Tensor-parallel ranks whose backward sums the activation gradients over the group the
    /// function returns (the group itself, or a stand-in), on `replicas` data-parallel
    /// replicas if set.
    TensorParallel {
        ranks: usize,
        gradient_group: &'a (dyn Fn(Arc<dyn Collective>) -> Arc<dyn Collective> + Sync),
        replicas: Option<WorldSize>,
        /// Pipeline stages of each rank's part (TP x PP), "f" summing over the group
        /// `gradient_group` returns for each stage's group.
        stages: Option<usize>,
        /// Each part's optimizer state sharded over its `replicas`.
        zero: Option<ZeroStage>,
    },
    /// Pipelines of `stages` stages under `schedule`, on `ranks` data-parallel ranks if set;
    /// `untie` gives the last stage a copy of the tied embedding, whose head gradient then
    /// never reaches the embedding.
    Pipeline {
        stages: usize,
        schedule: PipelineSchedule,
        untie: bool,
        ranks: Option<WorldSize>,
    },
}

/// Parameters after 20 steps (AdamW, clipping active) of a 2-layer GPT on windows of the
/// shipped text, trained as `mode` says.
fn twenty_steps(mode: Mode<'_>) -> Vec<f32> {
    let run = tempfile::tempdir().unwrap();
    let (params, report) = steps_in(mode, run.path(), false, None).unwrap();
    assert_eq!(report.history.last().unwrap().step, 20);
    params
}

/// [`twenty_steps`] in `run` (resumed from its latest checkpoint with `resume`); with
/// `stop_at`, a training step asks the run to stop (as SIGTERM does) when it reaches that
/// micro-batch, counted over every rank's calls (Single and TensorParallel modes).
fn steps_in(
    mode: Mode<'_>,
    run: &std::path::Path,
    resume: bool,
    stop_at: Option<usize>,
) -> kiln::trainer::Result<(Vec<f32>, kiln::trainer::FitReport)> {
    let device = Device::flex().autodiff();
    let text = std::fs::read(repo("data/shakespeare/input.txt")).unwrap();
    let corpus = ByteCorpus::new(text[..20_000].to_vec(), "shakespeare");
    let (train, val) = corpus.split(16, 0.1).unwrap();
    let (train, val) = (train.limit(160), val.limit(16));
    let config = GptConfig {
        vocab_size: 256,
        block_size: 16,
        layers: 2,
        heads: 4,
        embed: 16,
        tied_head: true,
    };
    let model = config.init(&device, 3).unwrap();
    let trainer_config = TrainerConfig {
        epochs: 1,
        batch_size: 8,
        eval_batch_size: 8,
        lr: 3e-3,
        optimizer: OptimizerConfig::adamw(0.1),
        schedule: LrSchedule::Constant,
        clip_grad_norm: Some(0.5),
        ..TrainerConfig::default()
    };
    let stop = StopSignal::new();
    let trainer = Trainer::new(trainer_config, run, RunLabels::named("tp", "gpt"))?
        .with_verbosity(Verbosity::Quiet)
        .with_stop(stop.clone());
    let resume = match resume {
        true => kiln::trainer::checkpoint::load_latest(run)?,
        false => None,
    };
    let batches = AtomicUsize::new(0);
    let count = || {
        if Some(batches.fetch_add(1, Ordering::SeqCst)) == stop_at {
            stop.request(15);
        }
    };
    let data = Data {
        train: &train,
        eval: &val,
        batcher: &TokenBatcher,
    };
    let step = |model: &Gpt, batch: TokenBatch| -> StepResult<StepOutput> {
        let [b, t] = batch.targets.dims();
        Ok(StepOutput::new(
            model.loss(batch.inputs, batch.targets),
            b * t,
        ))
    };
    let counted = |model: &Gpt, batch: TokenBatch| {
        count();
        step(model, batch)
    };
    let (model, report) = match mode {
        Mode::Single => trainer.fit_model(
            model,
            Steps {
                train: &counted,
                eval: &step,
            },
            data,
            resume,
            &Execution::Single(device.clone()),
        ),
        Mode::Pipeline {
            stages,
            schedule,
            untie,
            ranks,
        } => {
            let split = |m: &Gpt| -> Vec<Box<dyn PipelineStage>> {
                let mut parts = m.pipeline_stages(stages).unwrap();
                if untie {
                    let last = parts.last_mut().unwrap();
                    let copy = last
                        .wte
                        .as_ref()
                        .unwrap()
                        .weight
                        .val()
                        .detach()
                        .require_grad();
                    last.wte.as_mut().unwrap().weight = Param::from_tensor(copy);
                }
                parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, part)| -> Box<dyn PipelineStage> {
                        match i {
                            0 => Box::new(ModuleStage::new(
                                "0",
                                part,
                                GptStage::forward_tokens,
                                device.clone(),
                            )),
                            _ => Box::new(ModuleStage::new(
                                "n",
                                part,
                                GptStage::forward_hidden,
                                device.clone(),
                            )),
                        }
                    })
                    .collect()
            };
            let split = PipelineSplit {
                device: device.clone(),
                config: PipelineConfig {
                    schedule,
                    micro_batches: NonZeroUsize::new(4).unwrap(),
                    timeout: Duration::from_secs(60),
                    // Each stage on a pool of its own thread, as the recipe runs them (two
                    // data-parallel pipelines sharing pools once deadlocked).
                    threads_per_stage: Some(NonZeroUsize::MIN),
                    defer_weight_gradients: true,
                },
                stages: NonZeroUsize::new(stages).unwrap(),
                split: &split,
                data_parallel: ranks,
                zero: None,
                process_group: None,
            };
            let inputs = |batch: TokenBatch| {
                (
                    Activation::Rank2(batch.inputs.float()),
                    Targets::Tokens(batch.targets),
                )
            };
            trainer.fit_pipeline_model(model, &inputs, &step, data, resume, split)
        }
        Mode::TensorParallel {
            ranks,
            gradient_group,
            replicas,
            stages,
            zero,
        } => {
            let split = |m: &Gpt, group: Arc<dyn Collective>| match stages {
                Some(stages) => Ok(TensorParallelGpt::split_pipelined(m, group, stages)?
                    .with_stage_gradient_groups(gradient_group)),
                None => {
                    let sums = gradient_group(Arc::clone(&group));
                    Ok(TensorParallelGpt::split(m, group)?.with_gradient_group(sums))
                }
            };
            // In stages the LayerNorms' gradients are whole already.
            let no_sync =
                |_: &TensorParallelGpt, _: &mut GradientsParams, _: &dyn Collective| Ok(());
            let train = |part: &TensorParallelGpt, batch: TokenBatch| {
                count();
                match stages {
                    Some(_) => part.train_step_pipelined(
                        batch,
                        PipelineConfig {
                            schedule: PipelineSchedule::OneFOneB,
                            micro_batches: NonZeroUsize::new(4).unwrap(),
                            timeout: Duration::from_secs(60),
                            threads_per_stage: Some(NonZeroUsize::MIN),
                            defer_weight_gradients: true,
                        },
                    ),
                    None => part.train_step(batch),
                }
            };
            let eval = |part: &TensorParallelGpt, batch: TokenBatch| -> StepResult<StepOutput> {
                let [b, t] = batch.targets.dims();
                Ok(StepOutput::new(part.loss(batch)?, b * t))
            };
            let split = TensorParallelSplit {
                devices: vec![device.clone(); ranks],
                collective: CollectiveConfig {
                    timeout: Duration::from_secs(60),
                },
                transport: Transport::SharedMemory,
                split: &split,
                gather: &TensorParallelGpt::gather,
                sync_gradients: match stages {
                    Some(_) => &no_sync,
                    None => &TensorParallelGpt::sync_gradients,
                },
                split_params: &TensorParallelGpt::split_params,
                data_parallel: replicas,
                process_group: None,
                pipeline_stages: stages.and_then(NonZeroUsize::new),
                zero,
            };
            let steps = TensorParallelSteps {
                train: &train,
                eval: &eval,
            };
            trainer.fit_tensor_parallel_model(model, steps, data, resume, split)
        }
    }?;
    Ok((parameters(&model.valid()), report))
}

fn tensor_parallel<'a>(
    ranks: usize,
    gradient_group: &'a (dyn Fn(Arc<dyn Collective>) -> Arc<dyn Collective> + Sync),
    replicas: usize,
    zero: Option<ZeroStage>,
) -> Mode<'a> {
    Mode::TensorParallel {
        ranks,
        gradient_group,
        replicas: (replicas > 1).then(|| WorldSize::new(replicas).unwrap()),
        stages: None,
        zero,
    }
}

#[test]
fn tensor_parallel_pipeline_stages_train_like_one_device_and_need_the_gradient_sum() {
    let itself = |group: Arc<dyn Collective>| group;
    let single = twenty_steps(Mode::Single);
    // TP 2 x PP 2, and DP 2 x TP 2 x PP 2 (8 stage threads), the last with each part's
    // optimizer state sharded over its 2 replicas too.
    let two = WorldSize::new(2).ok();
    for (replicas, zero) in [(None, None), (two, None), (two, Some(ZeroStage::One))] {
        let mode = Mode::TensorParallel {
            ranks: 2,
            gradient_group: &itself,
            replicas,
            stages: Some(2),
            zero,
        };
        let diff = max_abs_diff(&single, &twenty_steps(mode));
        let dp = replicas.map_or(1, WorldSize::get);
        let zero = zero.map_or(0, ZeroStage::number);
        eprintln!(
            "GPT, {dp} replicas x 2 tensor-parallel ranks x 2 stages (ZeRO {zero}) vs one device, 20 steps: max |delta param| = {diff:e}"
        );
        assert!(diff < 1e-5, "{dp} x 2 x 2, ZeRO {zero}: {diff}");
    }
    // Without "f" in the stages' backward each rank's LayerNorms and stream below a split
    // layer see their own heads' or columns' share of the gradient only.
    let no_sum = |group: Arc<dyn Collective>| -> Arc<dyn Collective> { Arc::new(NoReduce(group)) };
    let mode = Mode::TensorParallel {
        ranks: 2,
        gradient_group: &no_sum,
        replicas: None,
        stages: Some(2),
        zero: None,
    };
    let diff = max_abs_diff(&single, &twenty_steps(mode));
    assert!(
        diff > 1e-3,
        "without the gradient sum the difference is only {diff}"
    );
}

#[test]
fn tensor_parallel_blocks_train_like_one_device_and_need_the_backward_all_reduce() {
    let itself = |group: Arc<dyn Collective>| group;
    let single = twenty_steps(Mode::Single);
    // (tensor-parallel ranks, data-parallel replicas of them, ZeRO over the replicas)
    let (one, two) = (Some(ZeroStage::One), Some(ZeroStage::Two));
    for (ranks, replicas, zero) in [
        (2, 1, None),
        (4, 1, None),
        (2, 2, None),
        (2, 2, one),
        (2, 2, two),
    ] {
        let split = twenty_steps(tensor_parallel(ranks, &itself, replicas, zero));
        let diff = max_abs_diff(&single, &split);
        let zero = zero.map_or(0, ZeroStage::number);
        eprintln!(
            "GPT blocks over {ranks} ranks x {replicas} replicas (ZeRO {zero}) vs one device, 20 steps: max |delta param| = {diff:e}"
        );
        assert!(
            diff < 1e-5,
            "{ranks} ranks x {replicas} replicas, ZeRO {zero}: {diff}"
        );
    }
    // Without Megatron's "f" (the all-reduce of each branch's input gradient) every rank's
    // blocks below the top learn from their own heads' share only.
    let no_sum = |group: Arc<dyn Collective>| -> Arc<dyn Collective> { Arc::new(NoReduce(group)) };
    let diff = max_abs_diff(&single, &twenty_steps(tensor_parallel(2, &no_sum, 1, None)));
    assert!(
        diff > 1e-3,
        "without the backward all-reduce the difference is only {diff}"
    );
}

#[test]
fn a_tensor_parallel_run_stopped_inside_an_epoch_resumes_on_another_layout() {
    let itself = |group: Arc<dyn Collective>| group;
    let single = twenty_steps(Mode::Single);
    // (stopped layout, micro-batch calls before the stop counted over its ranks, resumed
    // layout): TP 2 -> one device; DP 2 x TP 2 with ZeRO-1 -> DP 2 x TP 4 (a mid-epoch
    // checkpoint keeps its data-parallel world: the ranks split that epoch's samples).
    let cases = [
        (
            "TP 2 -> 1 device",
            tensor_parallel(2, &itself, 1, None),
            14,
            Mode::Single,
        ),
        (
            "DP 2 x TP 2, ZeRO-1 -> DP 2 x TP 4",
            tensor_parallel(2, &itself, 2, Some(ZeroStage::One)),
            28,
            tensor_parallel(4, &itself, 2, None),
        ),
    ];
    for (name, stopped, stop_at, resumed) in cases {
        let run = tempfile::tempdir().unwrap();
        let error = steps_in(stopped, run.path(), false, Some(stop_at)).unwrap_err();
        let TrainError::Stopped { step, .. } = error else {
            panic!("{name}: {error}");
        };
        assert!((1..20).contains(&step), "{name}: stopped at step {step}");
        let (params, report) = steps_in(resumed, run.path(), true, None).unwrap();
        assert_eq!(report.history.last().unwrap().step, 20, "{name}");
        let diff = max_abs_diff(&single, &params);
        eprintln!(
            "GPT {name}, stopped at step {step} of 20 and resumed: max |delta param| vs one device = {diff:e}"
        );
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

fn pipeline(
    stages: usize,
    schedule: PipelineSchedule,
    untie: bool,
    ranks: Option<WorldSize>,
) -> Mode<'static> {
    Mode::Pipeline {
        stages,
        schedule,
        untie,
        ranks,
    }
}

#[test]
fn pipelined_blocks_train_like_one_device_and_need_the_tied_gradient() {
    let single = twenty_steps(Mode::Single);
    for (stages, schedule) in [
        (2, PipelineSchedule::OneFOneB),
        (2, PipelineSchedule::GPipe),
        (1, PipelineSchedule::OneFOneB),
    ] {
        let piped = twenty_steps(pipeline(stages, schedule, false, None));
        let diff = max_abs_diff(&single, &piped);
        eprintln!(
            "GPT in {stages} stages ({schedule:?}, 4 micro-batches) vs one device, 20 steps: max |delta param| = {diff:e}"
        );
        assert!(diff < 1e-5, "{stages} stages {schedule:?}: {diff}");
    }
    let both = twenty_steps(pipeline(
        2,
        PipelineSchedule::OneFOneB,
        false,
        WorldSize::new(2).ok(),
    ));
    let diff = max_abs_diff(&single, &both);
    eprintln!(
        "GPT data parallel 2 x pipeline 2 vs one device, 20 steps: max |delta param| = {diff:e}"
    );
    assert!(diff < 1e-5, "2 data-parallel pipelines of 2 stages: {diff}");
    // The tied embedding lives in the first and the last stage: without the sum of both
    // stages' gradients it learns from the input side only.
    let untied = twenty_steps(pipeline(2, PipelineSchedule::OneFOneB, true, None));
    let diff = max_abs_diff(&single, &untied);
    assert!(
        diff > 1e-3,
        "without the tied gradient the difference is only {diff}"
    );
}

/// `kiln train gpt --resume RUN --epochs 2` with the layout flags `layout`.
fn resume_tiny(run: &std::path::Path, layout: &[&str]) -> serde_json::Value {
    let run = run.to_str().unwrap();
    let mut args = vec!["train", "gpt", "--resume", run, "--epochs", "2", "--quiet"];
    args.extend_from_slice(layout);
    args.push("--json");
    last_json(&kiln_ok(&args))
}

#[test]
fn a_run_resumes_exactly_on_another_mesh_shape() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_text(dir.path());
    // A constant rate: a resumed run keeps the cosine it started with.
    let constant = ["--lr-schedule", "constant", "--limit", "320"];
    let whole = train_tiny(&data, &dir.path().join("whole"), "2", &constant);
    let tp = ["--tensor-parallel", "2"];
    // (how the first epoch ran, how the second does): every checkpoint is a single device's
    // file, ZeRO's state gathered from its shards too.
    let layouts: [(&str, &[&str], &[&str]); 6] = [
        ("tp2-to-1", &tp, &[]),
        ("1-to-tp2", &[], &tp),
        ("tp2-to-dp2", &tp, &["--ranks", "2"]),
        ("tp2-to-dp2xtp2", &tp, &["--mesh", "dp=2,tp=2"]),
        ("dp2-zero1-to-tp2", &["--ranks", "2", "--zero", "1"], &tp),
        (
            "dp2xtp2-zero2-to-1",
            &["--mesh", "dp=2,tp=2", "--zero", "2"],
            &[],
        ),
    ];
    for (name, first, second) in layouts {
        let run = dir.path().join(name);
        train_tiny(&data, &run, "1", &[&constant[..], first].concat());
        let resumed = resume_tiny(&run, second);
        assert_eq!(resumed["resumed_from_epoch"], 1, "{name}");
        for key in ["val_loss", "train_loss"] {
            let diff = (resumed[key].as_f64().unwrap() - whole[key].as_f64().unwrap()).abs();
            eprintln!("{name}: {key} differs from the uninterrupted run by {diff:e}");
            assert!(diff < 1e-5, "{name}: {key} differs by {diff}");
        }
    }
}

#[test]
fn train_gpt_tensor_parallel_and_pipelined_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_text(dir.path());
    let twenty = ["--limit", "320"];
    let one = train_tiny(&data, &dir.path().join("one"), "1", &twenty);
    let piped = train_tiny(
        &data,
        &dir.path().join("pp"),
        "1",
        &[&twenty[..], &["--pipeline-stages", "1"]].concat(),
    );
    let diff = (piped["val_loss"].as_f64().unwrap() - one["val_loss"].as_f64().unwrap()).abs();
    assert!(
        diff < 1e-5,
        "--pipeline-stages 1 differs from one device by {diff}"
    );
    assert_clean_failure(
        &kiln(&[
            "train",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--pipeline-stages",
            "2",
            "--layers",
            "3",
            "--heads",
            "2",
            "--embed",
            "16",
            "--out",
            dir.path().join("z").to_str().unwrap(),
        ]),
        &["--pipeline-stages", "3 blocks"],
    );
    let run = dir.path().join("tp");
    let tp = train_tiny(
        &data,
        &run,
        "1",
        &[&twenty[..], &["--tensor-parallel", "2"]].concat(),
    );
    let diff = (tp["val_loss"].as_f64().unwrap() - one["val_loss"].as_f64().unwrap()).abs();
    assert!(
        diff < 1e-5,
        "--tensor-parallel 2 differs from one device by {diff}"
    );
    // The checkpoint holds the whole model.
    let text = last_json(&kiln_ok(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--tokens",
        "10",
        "--json",
    ]));
    assert_eq!(text["tokens"], 10);
    // ZeRO needs data-parallel replicas to shard over: a tensor-parallel run without any is
    // refused before the first step, naming the flag.
    let out = dir.path().join("zero-tp-pp");
    let zero_tp_pp = [
        "train",
        "gpt",
        "--mesh",
        "tp=2,pp=2",
        "--zero",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    assert_clean_failure(&kiln(&zero_tp_pp), &["--zero", "data-parallel"]);
    for (mesh, complaint) in [
        ("dp=2,xp=2", "unknown axis `xp`"),
        ("dp=2,dp=3", "axis dp is given twice"),
        ("tp=0", "1 or more"),
        ("dp2", "not AXIS=N"),
    ] {
        let out = dir.path().join("m");
        let out = out.to_str().unwrap();
        let output = kiln(&["train", "gpt", "--mesh", mesh, "--out", out]);
        // A usage error: clap's exit status 2.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{mesh}: {stderr}");
        assert!(stderr.contains(complaint), "{mesh}: {stderr}");
    }
    // Two data-parallel replicas of two tensor-parallel ranks: the same updates again.
    let mesh = train_tiny(
        &data,
        &dir.path().join("dp-tp"),
        "1",
        &[&twenty[..], &["--mesh", "tp=2,dp=2"]].concat(),
    );
    let diff = (mesh["val_loss"].as_f64().unwrap() - one["val_loss"].as_f64().unwrap()).abs();
    assert!(
        diff < 1e-5,
        "--mesh dp=2,tp=2 differs from one device by {diff}"
    );
    assert_eq!(mesh["ranks"], 2);
    assert_eq!(mesh["tensor_parallel"]["ranks"], 2);
    // With each part's AdamW state sharded over its 2 replicas (ZeRO-2): the same updates,
    // half the state per rank.
    let sharded = train_tiny(
        &data,
        &dir.path().join("dp-tp-zero"),
        "1",
        &[&twenty[..], &["--mesh", "tp=2,dp=2", "--zero", "2"]].concat(),
    );
    let diff = (sharded["val_loss"].as_f64().unwrap() - one["val_loss"].as_f64().unwrap()).abs();
    assert!(diff < 1e-5, "--mesh dp=2,tp=2 --zero 2 differs by {diff}");
    assert_eq!(sharded["zero_stage"], 2);
    let state_bytes = |report: &serde_json::Value| {
        report["tensor_parallel"]["optimizer_state_bytes_per_rank"]
            .as_u64()
            .unwrap() as i64
    };
    assert!(
        (2 * state_bytes(&sharded) - state_bytes(&mesh)).abs() <= 8,
        "{sharded}"
    );
    let state = std::fs::read_to_string(dir.path().join("dp-tp-zero").join("run.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["mode"],
        "tensor parallel x2 x data parallel 2, ZeRO-2"
    );
    // Tensor-parallel pipeline stages: two blocks, one per stage.
    let two_blocks = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let extra = [&["--limit", "320"], extra].concat();
        let args = tiny_gpt_args(&data, &out, "2", "1", &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        last_json(&kiln_ok(&args))["val_loss"].as_f64().unwrap()
    };
    let one = two_blocks("two-blocks", &[]);
    for (layout, mode) in [
        ("tp=2,pp=2", "tensor parallel x2 x pipeline 2 stages"),
        (
            "dp=2,tp=2,pp=2",
            "tensor parallel x2 x pipeline 2 stages x data parallel 2",
        ),
    ] {
        let diff = (two_blocks(layout, &["--mesh", layout]) - one).abs();
        assert!(
            diff < 1e-5,
            "--mesh {layout} differs from one device by {diff}"
        );
        // run.json names the whole layout.
        let state = std::fs::read_to_string(dir.path().join(layout).join("run.json")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert_eq!(state["mode"], mode, "{layout}");
    }
    assert_clean_failure(
        &kiln(&[
            "train",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--tensor-parallel",
            "3",
            "--out",
            dir.path().join("y").to_str().unwrap(),
        ]),
        &["4 heads do not split evenly over 3 ranks"],
    );
}

/// Two tensor-parallel ranks split from one shared model in threads train at the same time:
/// their parts must not share autodiff nodes (the replicated embeddings and norms were clones
/// of the model's, and Burn's graph locks deadlocked once — `benches/gpt_memory.rs` hung, gdb
/// showed one rank in `GraphCleaner::init`, the other in `GraphLocator::select`). The race is
/// rare: this test did not hang on the old code in 9 runs, so it guards rather than proves;
/// a hang fails it after two minutes instead of stalling the suite.
#[test]
fn tensor_parallel_parts_of_one_shared_model_train_at_once() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let device = Device::flex().autodiff();
        // The default model: the ops must be long enough for the ranks' passes to overlap.
        let config = GptConfig::small();
        let model = config.init(&device, 5).unwrap();
        let world = WorldSize::new(2).unwrap();
        let losses = kiln::multi::run_in_process(world, CollectiveConfig::default(), |group| {
            let part = TensorParallelGpt::split(&model, group)?;
            let mut losses: Vec<f32> = Vec::new();
            for step in 0..10 {
                let ids: Vec<i64> = (0..32 * 64).map(|i| (i * 7 + step) % 256).collect();
                let ids = |shift: i64| {
                    let v: Vec<i64> = ids.iter().map(|t| (t + shift) % 256).collect();
                    Tensor::<2, Int>::from_data(TensorData::new(v, [32, 64]), &device)
                };
                let batch = TokenBatch {
                    inputs: ids(0),
                    targets: ids(1),
                };
                let out = part
                    .train_step(batch)
                    .map_err(|e| kiln::multi::MultiError::Config {
                        field: "step",
                        reason: e.to_string(),
                    })?;
                losses.push(out.output.loss.into_scalar());
            }
            Ok::<_, kiln::multi::MultiError>(losses)
        });
        let _ = done.send(losses.map_err(|e| e.to_string()));
    });
    let losses = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the ranks deadlocked (no result within 2 minutes)")
        .unwrap();
    assert_eq!(losses[0], losses[1], "both ranks see the same loss");
    assert!(losses[0].iter().all(|l| l.is_finite()), "{losses:?}");
}
