//! The gpt recipe: a byte-level GPT ([`kiln_models::gpt`]) trained on a text by the general
//! trainer ([`Trainer::fit_model`]) with AdamW, linear warm-up and cosine decay, and gradient
//! clipping, on one device, data parallel over threads (`--ranks`, `--zero`) or as one rank
//! of a launched job; and [`generate`], which samples from a checkpoint with a key/value
//! cache. [`tensor_parallel`] splits the blocks over ranks (Megatron).

pub mod tensor_parallel;
pub mod tp_pipeline;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use kiln_models::gpt::{Gpt, GptConfig, GptStage, Sampling};
use kiln_multi::pipeline::{Activation, ModuleStage, PipelineConfig, PipelineStage, Targets};
use kiln_multi::{
    BucketConfig, Collective, CollectiveConfig, DeviceSpec, Rank, Transport, WorldSize, ZeroStage,
};
use kiln_trainer::checkpoint::{Checkpoint, read_checkpoint, resolve_checkpoint};
use kiln_trainer::data::{
    BYTE_VOCAB, ByteCorpus, TokenBatch, TokenBatcher, TokenWindow, TokenWindows,
};
use kiln_trainer::report::Verbosity;
use kiln_trainer::{
    Data, Execution, FitReport, OptimizerConfig, PipelineSplit, ProcessGroupConfig, RunLabels,
    StepOutput, StepResult, Steps, StopSignal, TensorParallelSplit, TensorParallelSteps, Trainer,
    TrainerConfig,
};

use self::tensor_parallel::TensorParallelGpt;
use serde::{Deserialize, Serialize};

use crate::cnn_mnist::{PipelineOptions, RunTarget, ScheduleChoice, TrainerOverrides};
use crate::config_file::{ResolvedConfig, write_run_config};
use crate::error::{RecipeError, Result};
use crate::report::{GenerateReport, GptReport, TensorParallelReport};
use crate::run_info::{self, ModelName};

/// Name of this recipe, recorded in checkpoints.
pub const RECIPE: &str = "gpt";
/// The default corpus: Tiny Shakespeare (`data/shakespeare/PROVENANCE.md`).
const EMBEDDED_TEXT: &[u8] = include_bytes!("../../../data/shakespeare/input.txt");
/// How errors and reports name the embedded corpus.
const EMBEDDED_NAME: &str = "embedded:shakespeare";
/// Optimizer steps of linear warm-up in the default schedule.
const WARMUP_STEPS: u64 = 50;
/// Tokens of the sample a finished run writes into its report.
const SAMPLE_TOKENS: usize = 200;

/// Settings recorded in the checkpoint that rebuild the model and its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptOptions {
    /// The model's shape.
    pub model: GptConfig,
    /// The text trained on; `None` for the embedded corpus.
    pub data: Option<PathBuf>,
    /// Share of the text (its end) kept for validation.
    pub validation: f64,
    /// `--limit`: the first N training windows only.
    pub train_limit: Option<usize>,
}

/// Configuration of `kiln train gpt`.
#[derive(Debug, Clone)]
pub struct GptRecipeConfig {
    /// The model and data of a fresh run (a resumed run keeps its checkpoint's).
    pub options: GptOptions,
    /// Hyper-parameters set by the user.
    pub overrides: TrainerOverrides,
    /// Output directory, or the run to resume.
    pub target: RunTarget,
    /// What is printed on stderr.
    pub verbosity: Verbosity,
    /// Data-parallel ranks (threads).
    pub ranks: WorldSize,
    /// ZeRO stage over the data-parallel ranks.
    pub zero: Option<ZeroStage>,
    /// Split the blocks over this many ranks (threads), Megatron-style.
    pub tensor_parallel: Option<WorldSize>,
    /// Run the blocks as a pipeline of stages (threads) with micro-batches.
    pub pipeline: Option<PipelineOptions>,
    /// How long a rank waits for the others.
    pub collective_timeout: Duration,
    /// The device of rank 0; further ranks take the next GPUs.
    pub device: DeviceSpec,
    /// This process's group when it is one rank of a launched job.
    pub process_group: Option<Arc<dyn Collective>>,
    /// The resolved flags to write into the run directory as `config.toml`.
    pub run_config: Option<ResolvedConfig>,
}

/// The recipe's trainer defaults: 3 epochs of batches of 32 windows, AdamW (weight decay
/// 0.1) at 2e-3 with 50 warm-up steps and a cosine down to 2e-4, gradients clipped to 1.
pub fn default_trainer_config() -> TrainerConfig {
    TrainerConfig {
        epochs: 3,
        batch_size: 32,
        eval_batch_size: 64,
        lr: 2e-3,
        optimizer: OptimizerConfig::adamw(0.1),
        clip_grad_norm: Some(1.0),
        ..TrainerConfig::default()
    }
}

impl GptOptions {
    /// The training and validation windows of the recorded text.
    ///
    /// # Errors
    /// [`kiln_trainer::TrainError`]s naming the file when it cannot be read or is too short.
    pub fn open_data(&self) -> Result<(TokenWindows, TokenWindows)> {
        let corpus = match &self.data {
            Some(path) => ByteCorpus::read(path)?,
            None => ByteCorpus::new(EMBEDDED_TEXT, EMBEDDED_NAME),
        };
        let (train, val) = corpus.split(self.model.block_size, self.validation)?;
        Ok((
            self.train_limit.map_or(train.clone(), |n| train.limit(n)),
            val,
        ))
    }

    fn from_checkpoint(file: &Path, checkpoint: &Checkpoint) -> Result<Self> {
        if ModelName::parse(&checkpoint.state.model, file)? != ModelName::Gpt {
            return Err(RecipeError::Options {
                flag: "--resume",
                reason: format!(
                    "{} holds a {} run, not a GPT",
                    file.display(),
                    checkpoint.state.model
                ),
            });
        }
        run_info::from_map(&checkpoint.state.options, file, RECIPE)
    }
}

/// The training step: the mean cross-entropy over every token of the batch.
fn step(model: &Gpt, batch: TokenBatch) -> StepResult<StepOutput> {
    let [b, t] = batch.targets.dims();
    Ok(StepOutput::new(
        model.loss(batch.inputs, batch.targets),
        b * t,
    ))
}

/// Trains the GPT, evaluating and checkpointing after every epoch, and samples a few lines
/// from the result.
///
/// # Errors
/// Data errors naming the file, [`RecipeError::RunExists`] for a fresh run into a used
/// directory, checkpoint errors on `--resume`, [`RecipeError::Options`] for a bad model shape.
pub fn run(config: &GptRecipeConfig) -> Result<GptReport> {
    let started = Instant::now();
    let (run_dir, resume) = config.target.open()?;
    let (options, base) = options_and_base(config, resume.as_ref())?;
    let device = config.device.device()?.autodiff();
    let (train, val) = options.open_data()?;
    let overrides = with_default_schedule(&config.overrides, &base, resume.is_none(), train.len());
    let trainer_config = overrides.apply(base, train.len())?;
    let labels = RunLabels {
        recipe: RECIPE.into(),
        model: ModelName::Gpt.as_str().into(),
        quantization: None,
        options: run_info::to_map(&options),
    };
    let trainer = Trainer::new(trainer_config, &run_dir, labels)?
        .with_verbosity(config.verbosity)
        .with_stop(StopSignal::process());
    let root = config
        .process_group
        .as_ref()
        .is_none_or(|g| g.rank() == Rank::ZERO);
    if let (Some(resolved), true) = (&config.run_config, root) {
        write_run_config(resolved, trainer.config(), &run_dir, resume.is_some())?;
    }
    let model = options.model.init(&device, trainer.config().seed)?;
    let parameters = model.num_params();
    let data = Data {
        train: &train,
        eval: &val,
        batcher: &TokenBatcher,
    };
    let (model, fit) = match (config.tensor_parallel, config.pipeline) {
        (Some(world), _) => fit_tensor_parallel(config, &trainer, model, data, resume, world)?,
        (None, Some(pipeline)) => fit_pipeline(config, &trainer, model, data, resume, pipeline)?,
        (None, None) => {
            let steps = Steps {
                train: &step,
                eval: &step,
            };
            let execution = execution(config, &device)?;
            trainer.fit_model(model, steps, data, resume, &execution)?
        }
    };
    if root {
        crate::plot::write_run_curves(&run_dir, config.verbosity == Verbosity::Quiet);
    }
    let sample = sample_text(
        &model.valid(),
        &device.clone().inner(),
        trainer.config().seed,
    )?;
    Ok(report(
        config, &options, run_dir, parameters, fit, sample, started,
    ))
}

/// The blocks split over `world` ranks (threads, or the processes of a launched job),
/// Megatron-style.
fn fit_tensor_parallel(
    config: &GptRecipeConfig,
    trainer: &Trainer,
    model: Gpt,
    data: Data<'_, TokenWindow, TokenBatch>,
    resume: Option<(PathBuf, Checkpoint)>,
    world: WorldSize,
) -> Result<(Gpt, FitReport)> {
    let replicas = launched_replicas(config, world)?;
    let (devices, transport) = match &config.process_group {
        // This process's device: the launcher already chose it.
        Some(_) => (
            vec![config.device.device()?.autodiff()],
            Transport::SharedMemory,
        ),
        None => (
            config
                .device
                .devices(world.get())?
                .into_iter()
                .map(Device::autodiff)
                .collect(),
            config.device.transport(world.get())?,
        ),
    };
    // With a pipeline, each rank's part runs its blocks as stages whose backward is Burn's
    // own ("f" an autodiff op), which leaves the LayerNorms' gradients whole.
    let stages = config.pipeline.map(|p| p.stages.get());
    let split_pipelined = |m: &Gpt, group: Arc<dyn Collective>| match stages {
        Some(stages) => TensorParallelGpt::split_pipelined(m, group, stages),
        None => TensorParallelGpt::split(m, group),
    };
    let no_sync = |_: &TensorParallelGpt, _: &mut GradientsParams, _: &dyn Collective| Ok(());
    let split = TensorParallelSplit {
        devices,
        collective: CollectiveConfig {
            timeout: config.collective_timeout,
        },
        transport,
        split: &split_pipelined,
        gather: &TensorParallelGpt::gather,
        sync_gradients: match stages {
            Some(_) => &no_sync,
            None => &TensorParallelGpt::sync_gradients,
        },
        split_params: &TensorParallelGpt::split_params,
        data_parallel: (replicas.get() > 1).then_some(replicas),
        process_group: config.process_group.clone(),
        pipeline_stages: config.pipeline.map(|p| p.stages),
        zero: config.zero,
    };
    let eval = |part: &TensorParallelGpt, batch: TokenBatch| -> StepResult<StepOutput> {
        let [b, t] = batch.targets.dims();
        Ok(StepOutput::new(part.loss(batch)?, b * t))
    };
    let pipelined = |part: &TensorParallelGpt, batch: TokenBatch| match config.pipeline {
        Some(options) => {
            let pipeline = PipelineConfig {
                schedule: options.schedule,
                micro_batches: options.micro_batches,
                timeout: config.collective_timeout,
                threads_per_stage: Some(NonZeroUsize::MIN),
                defer_weight_gradients: true,
            };
            part.train_step_pipelined(batch, pipeline)
        }
        None => part.train_step(batch),
    };
    let steps = TensorParallelSteps {
        train: &pipelined,
        eval: &eval,
    };
    Ok(trainer.fit_tensor_parallel_model(model, steps, data, resume, split)?)
}

/// The data-parallel replicas of `tensor`-rank groups: `--ranks` threads, or under a
/// launcher the job's processes divided into groups (rank = replica x tensor + shard).
fn launched_replicas(config: &GptRecipeConfig, tensor: WorldSize) -> Result<WorldSize> {
    let Some(group) = &config.process_group else {
        return Ok(config.ranks);
    };
    let processes = group.world_size().get();
    let replicas = processes / tensor.get();
    if !processes.is_multiple_of(tensor.get())
        || (config.ranks.get() > 1 && config.ranks.get() != replicas)
    {
        return Err(RecipeError::Options {
            flag: "--tensor-parallel",
            reason: format!(
                "the launched job's {processes} processes do not split into groups of {} \
                 tensor-parallel ranks{}",
                tensor.get(),
                match config.ranks.get() {
                    1 => String::new(),
                    n => format!(", {n} of them (--ranks/dp)"),
                }
            ),
        });
    }
    Ok(WorldSize::new(replicas)?)
}

/// The blocks as a pipeline: equal numbers of blocks per stage, each stage on its own thread
/// with its share of the cores (or its own GPU), micro-batches under the schedule.
fn fit_pipeline(
    config: &GptRecipeConfig,
    trainer: &Trainer,
    model: Gpt,
    data: Data<'_, TokenWindow, TokenBatch>,
    resume: Option<(PathBuf, Checkpoint)>,
    options: PipelineOptions,
) -> Result<(Gpt, FitReport)> {
    let stages = options.stages;
    let devices: Vec<Device> = config
        .device
        .devices(stages.get())?
        .into_iter()
        .map(Device::autodiff)
        .collect();
    let threads = config.device.is_cpu().then(|| {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        NonZeroUsize::new(cores / (stages.get() * config.ranks.get())).unwrap_or(NonZeroUsize::MIN)
    });
    let split = |m: &Gpt| gpt_stages(m, &devices);
    let split = PipelineSplit {
        device: devices[0].clone(),
        config: PipelineConfig {
            schedule: options.schedule,
            micro_batches: options.micro_batches,
            timeout: config.collective_timeout,
            threads_per_stage: threads,
            defer_weight_gradients: true,
        },
        stages,
        split: &split,
        data_parallel: (config.ranks.get() > 1).then_some(config.ranks),
        zero: config.zero,
        process_group: config.process_group.clone(),
    };
    let inputs = |batch: TokenBatch| {
        (
            Activation::Rank2(batch.inputs.float()),
            Targets::Tokens(batch.targets),
        )
    };
    Ok(trainer.fit_pipeline_model(model, &inputs, &step, data, resume, split)?)
}

/// The GPT's pipeline stages, stage `i` on `devices[i]`: the first reads token ids, the last
/// gives logits.
fn gpt_stages(model: &Gpt, devices: &[Device]) -> Vec<Box<dyn PipelineStage>> {
    // The stage count was checked against the blocks before training started.
    let parts = model.pipeline_stages(devices.len()).unwrap_or_default();
    let parts = parts
        .into_iter()
        .zip(devices)
        .map(|(part, device)| crate::cnn_mnist::place(part, device))
        .collect();
    token_stages(
        parts,
        devices,
        GptStage::forward_tokens,
        GptStage::forward_hidden,
    )
}

/// `parts` as pipeline stages named "blocks 1", "blocks 2", ..., part `i` on `devices[i]`:
/// the first through `tokens` (token ids carried as floats), the others through `hidden`
/// (the residual stream, then the last stage's logits).
pub(super) fn token_stages<M: Module + 'static>(
    parts: Vec<M>,
    devices: &[Device],
    tokens: fn(&M, Tensor<2>) -> Tensor<3>,
    hidden: fn(&M, Tensor<3>) -> Tensor<3>,
) -> Vec<Box<dyn PipelineStage>> {
    parts
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(i, (part, device))| -> Box<dyn PipelineStage> {
            let name = format!("blocks {}", i + 1);
            match i {
                0 => Box::new(ModuleStage::new(name, part, tokens, device.clone())),
                _ => Box::new(ModuleStage::new(name, part, hidden, device.clone())),
            }
        })
        .collect()
}

/// The mesh shapes that run: data parallelism (threads, ZeRO, or launched processes) alone;
/// tensor parallelism, a pipeline, or both (tensor-parallel stages, on the CPU), alone or
/// with data-parallel replicas over threads (ZeRO over them in every case); under
/// `kiln launch`, the processes as one tensor-parallel group or as data-parallel ranks with a
/// pipeline each. A pipeline's stages hold equal numbers of blocks. Refused before the first
/// step, naming the flag.
fn check_parallelism(config: &GptRecipeConfig, model: &GptConfig) -> Result<()> {
    if let Some(p) = config.pipeline
        && !model.layers.is_multiple_of(p.stages.get())
    {
        return Err(RecipeError::Options {
            flag: "--pipeline-stages",
            reason: format!(
                "{} blocks (--layers) do not split into {} stages of equal size",
                model.layers, p.stages
            ),
        });
    }
    let launched = config.process_group.is_some();
    let (flag, what, other) = match (config.tensor_parallel, config.pipeline) {
        (Some(_), Some(_)) if !config.device.is_cpu() => (
            "--tensor-parallel",
            "tensor parallelism inside pipeline stages (its backward all-reduce is a CPU \
             kernel)",
            "a GPU device",
        ),
        (None, _) if launched && config.ranks.get() > 1 => (
            "--ranks",
            "data-parallel threads",
            "kiln launch (its processes are the data-parallel ranks)",
        ),
        _ => return Ok(()),
    };
    Err(RecipeError::Options {
        flag,
        reason: format!("{what} does not combine with {other} yet"),
    })
}

/// Bytes need a vocabulary of at least 256.
fn check_vocabulary(model: &GptConfig) -> Result<()> {
    if model.vocab_size < BYTE_VOCAB {
        return Err(RecipeError::Options {
            flag: "--vocab-size",
            reason: format!("byte tokens need {BYTE_VOCAB}, got {}", model.vocab_size),
        });
    }
    Ok(())
}

/// The flags with the recipe's schedule for a fresh run that names none: warm-up over 50
/// steps (a tenth of a shorter run), then a cosine over the whole run of `train_windows` per
/// epoch down to a tenth of the rate.
fn with_default_schedule(
    overrides: &TrainerOverrides,
    base: &TrainerConfig,
    fresh: bool,
    train_windows: usize,
) -> TrainerOverrides {
    let mut overrides = overrides.clone();
    if fresh && overrides.schedule.is_none() {
        let batch = overrides.batch_size.unwrap_or(base.batch_size).max(1);
        let accumulation = overrides
            .accumulation_steps
            .unwrap_or(base.accumulation_steps)
            .get();
        let epochs = overrides.epochs.unwrap_or(base.epochs);
        let steps = train_windows.div_ceil(batch).div_ceil(accumulation) * epochs;
        overrides.schedule = Some(ScheduleChoice::Cosine {
            warmup_steps: WARMUP_STEPS.min(steps as u64 / 10),
            min_lr: overrides.lr.unwrap_or(base.lr) / 10.0,
        });
    }
    overrides
}

/// The trainer settings a gpt run resolves (`--print-config`).
///
/// # Errors
/// Checkpoint and data errors, [`RecipeError::Options`] for flags that do not combine.
pub fn resolved_trainer_config(config: &GptRecipeConfig) -> Result<TrainerConfig> {
    let (_, resume) = config.target.open()?;
    let (options, base) = options_and_base(config, resume.as_ref())?;
    let (train, _) = options.open_data()?;
    let overrides = with_default_schedule(&config.overrides, &base, resume.is_none(), train.len());
    overrides.apply(base, train.len())
}

/// The model and data settings and the trainer's base configuration: the checkpoint's when
/// resuming, else the flags' and the recipe's defaults.
fn options_and_base(
    config: &GptRecipeConfig,
    resume: Option<&(PathBuf, Checkpoint)>,
) -> Result<(GptOptions, TrainerConfig)> {
    let (options, base) = match resume {
        Some((file, checkpoint)) => (
            GptOptions::from_checkpoint(file, checkpoint)?,
            checkpoint.state.config.clone(),
        ),
        None => (config.options.clone(), default_trainer_config()),
    };
    options.model.validate().map_err(|e| RecipeError::Options {
        flag: "--layers/--heads/--embed/--block-size",
        reason: e.to_string(),
    })?;
    check_vocabulary(&options.model)?;
    check_parallelism(config, &options.model)?;
    Ok((options, base))
}

/// One device, ranks as threads, or this launched process.
fn execution(config: &GptRecipeConfig, device: &Device) -> Result<Execution> {
    Ok(match &config.process_group {
        Some(collective) => Execution::Process(ProcessGroupConfig {
            device: device.clone(),
            collective: Arc::clone(collective),
            buckets: BucketConfig::default(),
            zero: config.zero,
        }),
        None => Execution::on_ranks(
            config.device,
            config.ranks,
            config.collective_timeout,
            config.zero,
        )?,
    })
}

/// A short sample from a newline, for the report.
fn sample_text(model: &Gpt, device: &Device, seed: u64) -> Result<String> {
    let sampling = Sampling {
        temperature: 0.8,
        top_k: Some(40),
        seed,
    };
    let tokens = kiln_models::gpt::generate(
        model,
        &[u32::from(b'\n')],
        SAMPLE_TOKENS,
        sampling,
        true,
        device,
        |_| {},
    )?;
    Ok(decode(&tokens))
}

/// Bytes as text (invalid UTF-8 shown as U+FFFD).
fn decode(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn report(
    config: &GptRecipeConfig,
    options: &GptOptions,
    run_dir: PathBuf,
    parameters: usize,
    fit: FitReport,
    sample: String,
    started: Instant,
) -> GptReport {
    let last = fit.history.last();
    let val_loss = last.map_or(f64::NAN, |m| m.test_loss);
    let samples_per_sec = fit.samples_per_sec();
    GptReport {
        recipe: RECIPE.into(),
        run_dir,
        checkpoint: fit.last_checkpoint.clone(),
        model: options.model,
        parameters,
        data: options
            .data
            .clone()
            .unwrap_or_else(|| PathBuf::from(EMBEDDED_NAME)),
        epochs: fit.history.len(),
        steps: last.map_or(0, |m| m.step),
        train_loss: last.map_or(f64::NAN, |m| m.train_loss),
        val_loss,
        val_bits_per_byte: val_loss / std::f64::consts::LN_2,
        samples_per_sec,
        tokens_per_sec: samples_per_sec * options.model.block_size as f64,
        // Data-parallel ranks: a launched job's processes, unless they split the blocks.
        ranks: match (&config.process_group, config.tensor_parallel) {
            (Some(group), None) => group.world_size().get(),
            (Some(group), Some(tensor)) => group.world_size().get() / tensor.get(),
            (None, _) => config.ranks.get(),
        },
        zero_stage: config.zero.map(ZeroStage::number),
        tensor_parallel: config.tensor_parallel.map(|world| {
            let per_rank = fit.rank_parameter_elements.unwrap_or(parameters);
            TensorParallelReport {
                ranks: world.get(),
                parameter_elements_per_rank: per_rank,
                // AdamW keeps two moments per parameter, of this rank's shard under ZeRO.
                optimizer_state_bytes_per_rank: fit
                    .sharding
                    .map_or(2 * per_rank * size_of::<f32>(), |(_, memory)| {
                        memory.optimizer_state_bytes
                    }),
                gradient_bytes_per_rank: fit
                    .sharding
                    .map_or(per_rank * size_of::<f32>(), |(_, memory)| {
                        memory.gradient_bytes
                    }),
                unsharded_parameter_elements: parameters,
            }
        }),
        resumed_from_epoch: fit.resumed_from_epoch,
        history: fit.history,
        sample,
        wall_seconds: started.elapsed().as_secs_f64(),
    }
}

/// What `kiln generate` asks for.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// A gpt checkpoint or run directory (its latest checkpoint).
    pub checkpoint: PathBuf,
    /// The text to continue.
    pub prompt: String,
    /// Tokens (bytes) to add.
    pub tokens: usize,
    /// Temperature, top-k and seed.
    pub sampling: Sampling,
    /// Recompute every step instead of caching keys and values (a check; slower).
    pub no_cache: bool,
    /// Where the model runs.
    pub device: DeviceSpec,
}

/// Samples `tokens` bytes after the prompt from a trained GPT, calling `emit` with each
/// decoded piece as it is drawn.
///
/// # Errors
/// Checkpoint errors naming the file; [`RecipeError::Options`] for an empty prompt or a
/// checkpoint of another model.
pub fn generate(config: &GenerateConfig, mut emit: impl FnMut(&str)) -> Result<GenerateReport> {
    if config.prompt.is_empty() {
        return Err(RecipeError::Options {
            flag: "--prompt",
            reason: "is empty: give at least one character to continue".into(),
        });
    }
    let file = resolve_checkpoint(&config.checkpoint)?;
    let checkpoint = read_checkpoint(&file)?;
    let options = GptOptions::from_checkpoint(&file, &checkpoint).map_err(|e| match e {
        RecipeError::Options { reason, .. } => RecipeError::Options {
            flag: "--checkpoint",
            reason,
        },
        other => other,
    })?;
    let device = config.device.device()?;
    let model = checkpoint.load_model(options.model.init(&device, 0)?, &file)?;
    let prompt: Vec<u32> = config.prompt.bytes().map(u32::from).collect();
    let started = Instant::now();
    let mut pending = Vec::new();
    let tokens = kiln_models::gpt::generate(
        &model,
        &prompt,
        config.tokens,
        config.sampling,
        !config.no_cache,
        &device,
        |token| emit_utf8(&mut pending, token, &mut emit),
    )?;
    if !pending.is_empty() {
        emit(&String::from_utf8_lossy(&pending));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(GenerateReport {
        checkpoint: file,
        prompt: config.prompt.clone(),
        text: decode(&tokens),
        tokens: tokens.len(),
        tokens_per_sec: tokens.len() as f64 / seconds.max(f64::MIN_POSITIVE),
        temperature: config.sampling.temperature,
        top_k: config.sampling.top_k,
        seed: config.sampling.seed,
        cached: !config.no_cache,
    })
}

/// Passes whole UTF-8 characters on: a byte that starts or continues a multi-byte
/// character waits in `pending` until the character is complete (or cannot be).
fn emit_utf8(pending: &mut Vec<u8>, token: u32, emit: &mut impl FnMut(&str)) {
    pending.push(token.min(255) as u8);
    match std::str::from_utf8(pending) {
        Ok(text) => {
            emit(text);
            pending.clear();
        }
        Err(e) if e.error_len().is_some() || pending.len() >= 4 => {
            emit(&String::from_utf8_lossy(pending));
            pending.clear();
        }
        Err(_) => {}
    }
}

/// The model and data of a fresh run without flags: [`GptConfig::small`] on the embedded
/// corpus, 10 % of it for validation.
pub fn default_options() -> GptOptions {
    GptOptions {
        model: GptConfig::small(),
        data: None,
        validation: 0.1,
        train_limit: None,
    }
}
