//! The cnn-mnist recipe: SimpleCNN trained on MNIST as in PyTorch's tutorials
//! (SGD lr 0.01, momentum 0.9, batch 64, cross-entropy, 5 epochs).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::module::Module;
use burn::nn::Relu;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use kiln_models::quant::{QuantScheme, fake_quantize};
use kiln_models::{
    SimpleCnn, SimpleCnnBack, SimpleCnnClassifier, SimpleCnnConfig, SimpleCnnConvBlock,
};
use kiln_multi::pipeline::{ModuleStage, PipelineConfig, PipelineSchedule, PipelineStage};
use kiln_multi::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, sum_gradients};
use kiln_multi::{BucketConfig, Collective, DeviceSpec, WorldSize, ZeroStage};
use kiln_trainer::checkpoint::{
    Checkpoint, latest_checkpoint, read_checkpoint, resolve_checkpoint,
};
use kiln_trainer::data::{ImageDataset, MnistDataset, MnistSplit};
use kiln_trainer::report::Verbosity;
use kiln_trainer::{
    Execution, FitReport, LrSchedule, OptimizerConfig, PipelineSplit, ProcessGroupConfig,
    RunLabels, StopSignal, TensorParallelSplit, TrainData, Trainer, TrainerConfig,
};

use crate::config_file::{ResolvedConfig, write_run_config};
use crate::error::{RecipeError, Result};
use crate::mnist_data::MnistSource;
use crate::report::{PipelineReport, ShardingReport, TensorParallelReport, TrainReport};
use crate::run_info::{self, CnnMnistOptions, ModelName};

/// Name of this recipe, recorded in checkpoints.
pub const RECIPE: &str = "cnn-mnist";

/// Hyper-parameters given explicitly by the user. Unset ones come from the default recipe
/// for a fresh run, and from the checkpoint when resuming (where only `epochs` may differ).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainerOverrides {
    /// Total epochs.
    pub epochs: Option<usize>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// The optimizer and its settings.
    pub optimizer: OptimizerOverrides,
    /// The learning-rate schedule.
    pub schedule: Option<ScheduleChoice>,
    /// Clip gradients to this global L2 norm.
    pub clip_grad_norm: Option<f64>,
    /// Batches per optimizer step.
    pub accumulation_steps: Option<NonZeroUsize>,
    /// Optimizer steps between mid-epoch checkpoints.
    pub checkpoint_every: Option<std::num::NonZeroU64>,
    /// Epoch checkpoints kept: the last N (`Some(None)`: all).
    pub keep_last: Option<Option<NonZeroUsize>>,
    /// The best epoch kept by this figure.
    pub keep_best: Option<kiln_trainer::checkpoint::KeepBest>,
    /// Write checkpoints on the training thread.
    pub sync_checkpoints: bool,
}

/// The optimizer flags (`--optimizer`, `--momentum`, `--nesterov`, `--weight-decay`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OptimizerOverrides {
    /// Which optimizer, with its defaults (SGD momentum 0.9, Adam, AdamW decay 0.01).
    pub kind: Option<OptimizerKind>,
    /// SGD's momentum.
    pub momentum: Option<f64>,
    /// SGD with Nesterov's look-ahead.
    pub nesterov: bool,
    /// Weight decay (L2 for SGD and Adam, decoupled for AdamW).
    pub weight_decay: Option<f32>,
}

/// The optimizers a recipe can train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// SGD with momentum.
    Sgd,
    /// Adam.
    Adam,
    /// AdamW.
    AdamW,
}

/// A learning-rate schedule as the flags choose it; the cosine spans the run's steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleChoice {
    /// The base rate throughout.
    Constant,
    /// The rate times `gamma` every `every` steps.
    Step {
        /// Steps between decays.
        every: u64,
        /// Factor per decay.
        gamma: f64,
    },
    /// Linear warm-up over `warmup_steps`, then a cosine down to `min_lr` at the last step of
    /// the run (`--epochs`).
    Cosine {
        /// Warm-up steps.
        warmup_steps: u64,
        /// The final rate.
        min_lr: f64,
    },
}

impl TrainerOverrides {
    /// `base` with every set field replaced; a cosine schedule chosen here ends with the
    /// run's last optimizer step over `train_samples` samples (the ranks of data parallelism
    /// split each batch, so they do not change the count).
    ///
    /// # Errors
    /// [`RecipeError::Options`] for `--momentum` or `--nesterov` with an optimizer other than
    /// SGD.
    pub fn apply(&self, base: TrainerConfig, train_samples: usize) -> Result<TrainerConfig> {
        let epochs = self.epochs.unwrap_or(base.epochs);
        let batch_size = self.batch_size.unwrap_or(base.batch_size);
        let accumulation_steps = self.accumulation_steps.unwrap_or(base.accumulation_steps);
        let steps_per_epoch = train_samples
            .div_ceil(batch_size.max(1))
            .div_ceil(accumulation_steps.get()) as u64;
        let schedule = match self.schedule {
            None => base.schedule,
            Some(ScheduleChoice::Constant) => LrSchedule::Constant,
            Some(ScheduleChoice::Step { every, gamma }) => LrSchedule::Step { every, gamma },
            Some(ScheduleChoice::Cosine {
                warmup_steps,
                min_lr,
            }) => LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps: steps_per_epoch * epochs as u64,
                min_lr,
            },
        };
        Ok(TrainerConfig {
            epochs,
            batch_size,
            lr: self.lr.unwrap_or(base.lr),
            seed: self.seed.unwrap_or(base.seed),
            optimizer: self.optimizer.apply(base.optimizer)?,
            schedule,
            clip_grad_norm: self.clip_grad_norm.or(base.clip_grad_norm),
            accumulation_steps,
            checkpoint_every: self.checkpoint_every.or(base.checkpoint_every),
            retention: kiln_trainer::checkpoint::Retention {
                keep_last: self.keep_last.unwrap_or(base.retention.keep_last),
                keep_best: self.keep_best.clone().unwrap_or(base.retention.keep_best),
            },
            sync_checkpoints: self.sync_checkpoints || base.sync_checkpoints,
            ..base
        })
    }
}

impl OptimizerOverrides {
    fn apply(&self, base: OptimizerConfig) -> Result<OptimizerConfig> {
        let mut optimizer = match self.kind {
            None => base,
            Some(OptimizerKind::Sgd) => OptimizerConfig::sgd(0.9),
            Some(OptimizerKind::Adam) => OptimizerConfig::adam(),
            Some(OptimizerKind::AdamW) => OptimizerConfig::adamw(0.01),
        };
        let name = optimizer.name();
        let not_sgd = |flag: &'static str| RecipeError::Options {
            flag,
            reason: format!("applies to --optimizer sgd, not {name}"),
        };
        match &mut optimizer {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => {
                *momentum = self.momentum.unwrap_or(*momentum);
                *nesterov |= self.nesterov;
                *weight_decay = self.weight_decay.unwrap_or(*weight_decay);
            }
            OptimizerConfig::Adam { weight_decay, .. }
            | OptimizerConfig::AdamW { weight_decay, .. } => {
                if self.momentum.is_some() {
                    return Err(not_sgd("--momentum"));
                }
                if self.nesterov {
                    return Err(not_sgd("--nesterov"));
                }
                *weight_decay = self.weight_decay.unwrap_or(*weight_decay);
            }
        }
        Ok(optimizer)
    }
}

/// Where a run goes and whether it continues an earlier one.
#[derive(Debug, Clone, PartialEq)]
pub enum RunTarget {
    /// A fresh run in this directory, which must not already hold checkpoints.
    Fresh(PathBuf),
    /// Continue from a checkpoint file or from the latest checkpoint of a run directory.
    Resume(PathBuf),
}

impl RunTarget {
    /// The run directory, and the checkpoint (file and contents) to continue from.
    ///
    /// # Errors
    /// [`RecipeError::RunExists`] for a fresh run into a directory holding checkpoints;
    /// checkpoint errors for a resume.
    pub(crate) fn open(&self) -> Result<(PathBuf, Option<(PathBuf, Checkpoint)>)> {
        match self {
            RunTarget::Fresh(dir) => {
                if latest_checkpoint(dir)?.is_some() {
                    return Err(RecipeError::RunExists { path: dir.clone() });
                }
                Ok((dir.clone(), None))
            }
            RunTarget::Resume(path) => {
                let file = resolve_checkpoint(path)?;
                let checkpoint = read_checkpoint(&file)?;
                Ok((run_dir_of(&file), Some((file, checkpoint))))
            }
        }
    }
}

impl RunTarget {
    /// The trainer configuration of the checkpoint a resume continues; `None` for a fresh
    /// run.
    ///
    /// # Errors
    /// Checkpoint errors when the checkpoint cannot be found or read.
    pub fn base_config(&self) -> Result<Option<TrainerConfig>> {
        match self {
            RunTarget::Fresh(_) => Ok(None),
            RunTarget::Resume(path) => {
                let file = resolve_checkpoint(path)?;
                Ok(Some(read_checkpoint(&file)?.state.config))
            }
        }
    }
}

/// Configuration of the cnn-mnist recipe.
#[derive(Debug, Clone)]
pub struct CnnMnistConfig {
    /// Hyper-parameters set by the user.
    pub overrides: TrainerOverrides,
    /// Where the data comes from.
    pub data: MnistSource,
    /// Output directory, or the run to resume.
    pub target: RunTarget,
    /// What is printed on stderr.
    pub verbosity: Verbosity,
    /// Use only the first N training samples (quick checks); `None` uses all.
    pub train_limit: Option<usize>,
    /// Data-parallel ranks (threads with a replica each, on the CPU); one is plain training.
    pub ranks: WorldSize,
    /// How long a rank (or pipeline stage) waits for the others before failing the run.
    pub collective_timeout: Duration,
    /// Train through a pipeline of stages instead of on one device.
    pub pipeline: Option<PipelineOptions>,
    /// This process is one rank of a multi-process group (an MPI job): train data parallel
    /// with it; `ranks` must then be 1.
    pub process_group: Option<Arc<dyn Collective>>,
    /// Shard the optimizer state (ZeRO-1) or the state and gradients (ZeRO-2) over the ranks.
    pub zero: Option<ZeroStage>,
    /// Quantization-aware training: the forward pass sees the weights fake-quantized under
    /// this scheme. On resume, `None` continues with the checkpoint's scheme.
    pub qat: Option<QuantScheme>,
    /// The device of the run (of rank 0, or of the first pipeline stage): further ranks and
    /// stages take the next GPUs. For a launched process, the device of local rank 0.
    pub device: DeviceSpec,
    /// Tensor parallelism: SimpleCNN's classifier split over this many ranks (threads), which
    /// all train on the same batches ([`TensorParallelCnn`]).
    pub tensor_parallel: Option<WorldSize>,
    /// The resolved flags to write into the run directory as `config.toml` (the CLI sets
    /// it; `None` writes none), completed with the trainer settings the run resolves.
    pub run_config: Option<ResolvedConfig>,
}

/// Pipeline settings of a cnn-mnist run: SimpleCNN split into 2 stages (conv1 block | conv2
/// block + classifier) or 3 (conv1 block | conv2 block | classifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Stages: 2 or 3.
    pub stages: NonZeroUsize,
    /// Micro-batches per batch.
    pub micro_batches: NonZeroUsize,
    /// Order of forward and backward passes.
    pub schedule: PipelineSchedule,
}

/// SimpleCNN split into `stages` pipeline stages sharing `model`'s parameters, stage `i` on
/// `devices[i]` (its parameters forked there when that is not the model's device): conv1
/// block | conv2 block + classifier (the most even split of the work in two), or conv1 block |
/// conv2 block | classifier.
///
/// # Panics
/// When `devices` has fewer than `stages` devices.
pub fn simple_cnn_stages(
    model: &SimpleCnn,
    stages: usize,
    devices: &[Device],
) -> Vec<Box<dyn PipelineStage>> {
    assert!(devices.len() >= stages, "one device per pipeline stage");
    let (block1, block2) = model.conv_blocks();
    let first: Box<dyn PipelineStage> = Box::new(ModuleStage::new(
        "conv1",
        place(block1, &devices[0]),
        SimpleCnnConvBlock::forward,
        devices[0].clone(),
    ));
    if stages == 3 {
        vec![
            first,
            Box::new(ModuleStage::new(
                "conv2",
                place(block2, &devices[1]),
                SimpleCnnConvBlock::forward,
                devices[1].clone(),
            )),
            Box::new(ModuleStage::new(
                "classifier",
                place(model.classifier(), &devices[2]),
                SimpleCnnClassifier::forward,
                devices[2].clone(),
            )),
        ]
    } else {
        let back = SimpleCnnBack {
            block: block2,
            classifier: model.classifier(),
        };
        vec![
            first,
            Box::new(ModuleStage::new(
                "conv2+classifier",
                place(back, &devices[1]),
                SimpleCnnBack::forward,
                devices[1].clone(),
            )),
        ]
    }
}

/// `module` on `device`: itself when it is already there, else a fork (the same parameter
/// ids, so the stage's gradients still find their parameters in the whole model).
pub(crate) fn place<M: burn::module::Module>(module: M, device: &Device) -> M {
    if module.devices().iter().all(|d| d == device) {
        module
    } else {
        module.fork(device)
    }
}

/// SimpleCNN with its classifier split over a tensor-parallel group, Megatron-style: fc1
/// (3136 -> 128) keeps `128 / N` output features per rank ([`ColumnParallelLinear`]), fc2 the
/// matching input features ([`RowParallelLinear`], whose forward all-reduces the partial
/// logits); the conv blocks are replicated. Built by [`split`](Self::split) from a SimpleCNN,
/// turned back into one by [`gather`](Self::gather).
#[derive(Module, Debug)]
pub struct TensorParallelCnn {
    /// First conv block, replicated.
    pub conv1: SimpleCnnConvBlock,
    /// Second conv block, replicated.
    pub conv2: SimpleCnnConvBlock,
    /// This rank's output features of fc1.
    pub fc1: ColumnParallelLinear,
    /// This rank's input features of fc2.
    pub fc2: RowParallelLinear,
    relu: Relu,
    /// This rank's handle on the group, for the forward's all-reduce.
    #[module(skip)]
    group: Arc<dyn Collective>,
}

impl TensorParallelCnn {
    /// This rank's part of `model` in `group`.
    ///
    /// # Errors
    /// When the classifier's features do not split evenly over the group.
    pub fn split(model: &SimpleCnn, group: Arc<dyn Collective>) -> kiln_multi::Result<Self> {
        let (conv1, conv2) = model.conv_blocks();
        let classifier = model.classifier();
        let (world, rank) = (group.world_size(), group.rank());
        Ok(Self {
            conv1,
            conv2,
            fc1: ColumnParallelLinear::from_linear(&classifier.fc1, world, rank)?,
            fc2: RowParallelLinear::from_linear(&classifier.fc2, world, rank)?,
            relu: Relu::new(),
            group,
        })
    }

    /// Logits, exchanged with the other ranks (which must call it with the same batch).
    ///
    /// # Errors
    /// When the all-reduce of the partial logits fails (a peer failed or timed out).
    pub fn try_forward(&self, images: Tensor<4>) -> kiln_multi::Result<Tensor<2>> {
        let x = self
            .conv2
            .forward(self.conv1.forward(images))
            .flatten::<2>(1, 3);
        let h = self.relu.forward(self.fc1.forward(x));
        self.fc2.forward(h, &*self.group)
    }

    /// [`try_forward`](Self::try_forward) for the trainer, whose forward cannot fail: a
    /// failed exchange ends this rank, and the group reports it as the rank's error.
    ///
    /// # Panics
    /// When the exchange fails.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.try_forward(images)
            .unwrap_or_else(|e| panic!("tensor-parallel forward failed: {e}"))
    }

    /// The parameters holding this rank's share of the classifier: fc1's columns, fc2's rows.
    pub fn split_params(&self) -> Vec<burn::module::ParamId> {
        [self.fc1.split_params(), self.fc2.split_params()].concat()
    }

    /// Adds up over the ranks the conv blocks' gradients, each rank's covering only its share
    /// of the split classifier they feed.
    ///
    /// # Errors
    /// When the all-reduce fails.
    pub fn sync_gradients(
        &self,
        grads: &mut GradientsParams,
        group: &dyn Collective,
    ) -> kiln_multi::Result<()> {
        sum_gradients(&(self.conv1.clone(), self.conv2.clone()), grads, group)
    }

    /// The whole SimpleCNN from every rank's part; every rank calls it together.
    ///
    /// # Errors
    /// When the all-gather fails.
    pub fn gather(&self, group: &dyn Collective) -> kiln_multi::Result<SimpleCnn> {
        Ok(SimpleCnn::from_layers(
            self.conv1.conv.clone(),
            self.conv2.conv.clone(),
            self.fc1.gather(group)?,
            self.fc2.gather(group)?,
        ))
    }
}

/// How a cnn-mnist run executes. [`Plan::new`] is the one place where the combinations of
/// execution flags are checked, before any device or tensor is made.
enum Plan {
    /// One device (one rank, no group), `ranks` data-parallel threads, or this process as one
    /// rank of a launched `group`; the optimizer state optionally sharded.
    DataParallel {
        ranks: WorldSize,
        group: Option<Arc<dyn Collective>>,
        zero: Option<ZeroStage>,
    },
    /// Through a pipeline of 2 or 3 stages on one data-parallel rank.
    Pipeline(PipelineOptions),
    /// The classifier split over this many ranks, alone.
    TensorParallel(WorldSize),
}

impl Plan {
    /// The plan `config`'s flags describe, for a run under quantization-aware training
    /// `qat` (given, or the resumed checkpoint's), as rank `group` of a launch or not.
    ///
    /// # Errors
    /// [`RecipeError::Options`] naming the flag of a combination kiln cannot run.
    fn new(
        config: &CnnMnistConfig,
        group: Option<Arc<dyn Collective>>,
        qat: Option<QuantScheme>,
    ) -> Result<Self> {
        let refuse =
            |flag: &'static str, reason: String| Err(RecipeError::Options { flag, reason });
        let data_parallel = config.ranks != WorldSize::ONE || group.is_some();
        if let Some(tp) = config.tensor_parallel {
            let other = [
                (config.pipeline.is_some(), "--pipeline-stages"),
                (
                    data_parallel,
                    "data parallelism (--ranks, or a multi-process launch)",
                ),
                (config.zero.is_some(), "--zero"),
                (qat.is_some(), "--qat"),
            ];
            if let Some((_, flag)) = other.iter().find(|(set, _)| *set) {
                let reason = format!("combining it with {flag} is not supported yet");
                return refuse("--tensor-parallel", reason);
            }
            return Ok(Plan::TensorParallel(tp));
        }
        if let Some(options) = config.pipeline {
            if qat.is_some() {
                let reason = "quantization-aware training through a pipeline is not supported \
                              yet; train on one device or with --ranks";
                return refuse("--qat", reason.to_string());
            }
            if data_parallel || config.zero.is_some() {
                let reason = "combining a pipeline with data parallelism (--ranks, --zero, or a \
                              multi-process launch) is not supported yet";
                return refuse("--pipeline-stages", reason.to_string());
            }
            if !(2..=3).contains(&options.stages.get()) {
                let reason = format!(
                    "SimpleCNN splits into 2 stages (conv1 | conv2 + classifier) or 3 (conv1 | \
                     conv2 | classifier), not {}",
                    options.stages
                );
                return refuse("--pipeline-stages", reason);
            }
            return Ok(Plan::Pipeline(options));
        }
        if let Some(group) = &group
            && config.ranks != WorldSize::ONE
        {
            let reason = format!(
                "this process is rank {} of a {}-process launch, which runs one rank per \
                 process; drop --ranks",
                group.rank().index(),
                group.world_size().get()
            );
            return refuse("--ranks", reason);
        }
        if !data_parallel && config.zero.is_some() {
            let reason = "sharding splits the optimizer state over data-parallel ranks: add \
                          --ranks N (N >= 2) or start the run with kiln launch";
            return refuse("--zero", reason.to_string());
        }
        Ok(Plan::DataParallel {
            ranks: config.ranks,
            group,
            zero: config.zero,
        })
    }

    /// Devices the run takes in this process: one per thread-rank or pipeline stage.
    fn device_count(&self) -> usize {
        match self {
            Plan::DataParallel { ranks, .. } | Plan::TensorParallel(ranks) => ranks.get(),
            Plan::Pipeline(options) => options.stages.get(),
        }
    }
}

/// Trains SimpleCNN on MNIST, evaluating and checkpointing after every epoch.
///
/// # Errors
/// Data errors naming the bad file, [`RecipeError::RunExists`] for a fresh run into a used
/// directory, checkpoint errors on `--resume`, [`RecipeError::Options`] for flags that do not
/// combine, and I/O errors when writing.
pub fn run(config: &CnnMnistConfig) -> Result<TrainReport> {
    let started = std::time::Instant::now();
    let (device_spec, process_group) = launched_device(config)?;
    let (run_dir, resume) = config.target.open()?;
    let base = resume
        .as_ref()
        .map_or_else(TrainerConfig::default, |(_, c)| c.state.config.clone());
    let qat = match (config.qat, &resume) {
        (Some(scheme), _) => Some(scheme),
        (None, Some((file, checkpoint))) => checkpoint_quantization(file, &checkpoint.state)?,
        (None, None) => None,
    };
    let plan = Plan::new(config, process_group, qat)?;
    // Every device the run needs is checked before any tensor is made.
    let devices: Vec<Device> = device_spec
        .devices(plan.device_count())?
        .into_iter()
        .map(Device::autodiff)
        .collect();
    let labels = RunLabels {
        recipe: RECIPE.into(),
        model: ModelName::SimpleCnn.as_str().into(),
        quantization: qat.map(|scheme| scheme.to_string()),
        options: recorded_data(config, resume.as_ref())?,
    };
    // The data is read once every flag and the checkpoint have been checked.
    let (train, test) = load_data(config)?;
    let trainer_config = config.overrides.apply(base, train.len())?;
    let trainer = Trainer::new(trainer_config, &run_dir, labels)?
        .with_verbosity(config.verbosity)
        .with_stop(StopSignal::process());
    // Written once the settings are valid, so a refused run leaves no directory behind.
    if let (Some(resolved), true) = (&config.run_config, is_root(config)) {
        write_run_config(resolved, trainer.config(), &run_dir, resume.is_some())?;
    }
    let model = SimpleCnnConfig::new().init(&devices[0], trainer.config().seed);
    let data = TrainData {
        train: &train,
        test: &test,
    };
    let run = PlannedRun {
        config,
        trainer: &trainer,
        devices: &devices,
        device_spec,
        resume,
    };
    let global_batch_size = trainer.config().batch_size;
    let (fit, tensor_parallel) = match plan {
        Plan::TensorParallel(tp) => run.tensor_parallel(model, data, tp)?,
        Plan::Pipeline(options) => (run.pipeline(model, data, options)?, None),
        Plan::DataParallel { ranks, group, zero } => (
            run.data_parallel(model, data, ranks, group, zero, qat)?,
            None,
        ),
    };
    if is_root(config) {
        let quiet = config.verbosity == Verbosity::Quiet;
        crate::plot::write_run_curves(&run_dir, quiet);
    }
    Ok(TrainReport {
        tensor_parallel,
        wall_seconds: started.elapsed().as_secs_f64(),
        ..train_report(config, run_dir, device_spec, global_batch_size, qat, fit)
    })
}

/// Whether this process reports for the run: not a launched rank other than 0.
fn is_root(config: &CnnMnistConfig) -> bool {
    config
        .process_group
        .as_ref()
        .is_none_or(|g| g.rank() == kiln_multi::Rank::ZERO)
}

/// The trainer settings a cnn-mnist run resolves, without reading its data: the recipe's
/// defaults or its checkpoint's, with the flags over them (`--print-config`; a cosine
/// schedule's length depends on the data and is not a flag).
///
/// # Errors
/// Checkpoint errors for `--resume`, [`RecipeError::Options`] for flags that do not combine.
pub fn resolved_trainer_config(config: &CnnMnistConfig) -> Result<TrainerConfig> {
    let base = config.target.base_config()?.unwrap_or_default();
    config.overrides.apply(base, 1)
}

/// The device of the run and this process's group: a launched rank on CUDA takes its host's
/// GPU of its local rank and talks over NCCL.
fn launched_device(config: &CnnMnistConfig) -> Result<(DeviceSpec, Option<Arc<dyn Collective>>)> {
    match &config.process_group {
        Some(group) if config.device.is_cuda() => {
            let (device, nccl) = crate::distributed::on_gpu(
                Arc::clone(group),
                config.device,
                config.collective_timeout,
            )?;
            Ok((device, Some(nccl)))
        }
        other => Ok((config.device, other.clone())),
    }
}

/// The training (cut to `--limit`) and test splits, checked to fit SimpleCNN.
fn load_data(config: &CnnMnistConfig) -> Result<(MnistDataset, MnistDataset)> {
    let mut train = config.data.load(MnistSplit::Train)?;
    if let Some(limit) = config.train_limit {
        train = train.take(limit);
    }
    let test = config.data.load(MnistSplit::Test)?;
    check_image_shape(&train)?;
    check_image_shape(&test)?;
    Ok((train, test))
}

/// What every execution of a planned run shares.
struct PlannedRun<'a> {
    config: &'a CnnMnistConfig,
    trainer: &'a Trainer,
    /// One per thread-rank or stage, the first the model's.
    devices: &'a [Device],
    device_spec: DeviceSpec,
    resume: Option<(PathBuf, Checkpoint)>,
}

impl PlannedRun<'_> {
    /// One device or data parallel (threads, or this launched process), with QAT if set.
    fn data_parallel(
        self,
        model: SimpleCnn,
        data: TrainData<'_>,
        ranks: WorldSize,
        group: Option<Arc<dyn Collective>>,
        zero: Option<ZeroStage>,
        qat: Option<QuantScheme>,
    ) -> Result<FitReport> {
        let timeout = self.config.collective_timeout;
        let execution = match group {
            Some(collective) => Execution::Process(ProcessGroupConfig {
                device: self.devices[0].clone(),
                collective,
                buckets: BucketConfig::default(),
                zero,
            }),
            None => Execution::on_ranks(self.device_spec, ranks, timeout, zero)?,
        };
        // With QAT every step runs on fake-quantized weights; the gradients reach the float
        // weights through the straight-through estimator.
        let forward = move |m: &SimpleCnn, images: Tensor<4>| match qat {
            Some(scheme) => fake_quantize(m.clone(), scheme).forward(images),
            None => m.forward(images),
        };
        let (_model, fit) = (self.trainer).fit(model, forward, data, self.resume, &execution)?;
        Ok(fit)
    }

    /// Through a pipeline of `options.stages` stages, one device (GPU) or core share each.
    fn pipeline(
        self,
        model: SimpleCnn,
        data: TrainData<'_>,
        options: PipelineOptions,
    ) -> Result<FitReport> {
        // On the CPU, like one device per stage: the machine's cores shared out between the
        // stages. On CUDA each stage has its own GPU.
        let threads = self.device_spec.is_cpu().then(|| {
            let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
            NonZeroUsize::new(cores / options.stages.get()).unwrap_or(NonZeroUsize::MIN)
        });
        let devices = self.devices;
        let split = move |m: &SimpleCnn| simple_cnn_stages(m, options.stages.get(), devices);
        let split = PipelineSplit {
            device: devices[0].clone(),
            config: PipelineConfig {
                schedule: options.schedule,
                micro_batches: options.micro_batches,
                timeout: self.config.collective_timeout,
                threads_per_stage: threads,
                defer_weight_gradients: true,
            },
            stages: options.stages,
            split: &split,
            data_parallel: None,
            zero: None,
            process_group: None,
        };
        let (_model, fit) =
            (self.trainer).fit_pipeline(model, SimpleCnn::forward, data, self.resume, split)?;
        Ok(fit)
    }

    /// The classifier split over `tp` ranks; its report's memory figures.
    fn tensor_parallel(
        self,
        model: SimpleCnn,
        data: TrainData<'_>,
        tp: WorldSize,
    ) -> Result<(FitReport, Option<TensorParallelReport>)> {
        let split = TensorParallelSplit {
            devices: self.devices.to_vec(),
            collective: kiln_multi::CollectiveConfig {
                timeout: self.config.collective_timeout,
            },
            transport: self.device_spec.transport(tp.get())?,
            split: &TensorParallelCnn::split,
            gather: &TensorParallelCnn::gather,
            sync_gradients: &TensorParallelCnn::sync_gradients,
            split_params: &TensorParallelCnn::split_params,
            data_parallel: None,
            process_group: None,
            pipeline_stages: None,
            zero: None,
        };
        let whole = model.num_params();
        let (_model, fit) = self.trainer.fit_tensor_parallel(
            model,
            TensorParallelCnn::forward,
            data,
            self.resume,
            split,
        )?;
        let per_rank = fit.rank_parameter_elements.unwrap_or(whole);
        let parts = TensorParallelReport {
            ranks: tp.get(),
            parameter_elements_per_rank: per_rank,
            optimizer_state_bytes_per_rank: per_rank * size_of::<f32>(),
            gradient_bytes_per_rank: per_rank * size_of::<f32>(),
            unsharded_parameter_elements: whole,
        };
        Ok((fit, Some(parts)))
    }
}

/// The report of a finished cnn-mnist run.
fn train_report(
    config: &CnnMnistConfig,
    run_dir: PathBuf,
    device_spec: DeviceSpec,
    global_batch_size: usize,
    qat: Option<QuantScheme>,
    fit: FitReport,
) -> TrainReport {
    let bubbles: Vec<f64> = fit
        .history
        .iter()
        .skip(fit.resumed_from_epoch)
        .filter_map(|m| m.bubble_fraction)
        .collect();
    let last = fit.history.last();
    TrainReport {
        recipe: RECIPE.into(),
        run_dir,
        checkpoint: fit.last_checkpoint.clone(),
        epochs: fit.history.len(),
        test_accuracy: last.and_then(|m| m.test_accuracy).unwrap_or(0.0),
        test_loss: last.map_or(f64::NAN, |m| m.test_loss),
        train_loss: last.map_or(f64::NAN, |m| m.train_loss),
        samples_per_sec: fit.samples_per_sec(),
        ranks: config
            .process_group
            .as_ref()
            .map_or(config.ranks.get(), |g| g.world_size().get()),
        device: device_spec.to_string(),
        global_batch_size,
        pipeline: config.pipeline.map(|p| PipelineReport {
            stages: p.stages.get(),
            micro_batches: p.schedule.micro_batches(p.micro_batches).get(),
            schedule: format!("{:?}", p.schedule),
        }),
        bubble_fraction: (!bubbles.is_empty())
            .then(|| bubbles.iter().sum::<f64>() / bubbles.len() as f64),
        sharding: fit.sharding.map(|(stage, memory)| ShardingReport {
            zero_stage: stage.number(),
            parameter_elements: memory.parameter_elements,
            optimizer_state_bytes_per_rank: memory.optimizer_state_bytes,
            gradient_bytes_per_rank: memory.gradient_bytes,
            unsharded_optimizer_state_bytes: memory.unsharded_optimizer_state_bytes,
            unsharded_gradient_bytes: memory.unsharded_gradient_bytes,
        }),
        qat: qat.map(|scheme| scheme.to_string()),
        resumed_from_epoch: fit.resumed_from_epoch,
        history: fit.history,
        tensor_parallel: None,
        wall_seconds: 0.0,
    }
}

/// The quantization-aware training scheme a checkpoint records, if any.
///
/// # Errors
/// [`RecipeError::Train`] when the recorded scheme is not one kiln knows (a corrupt or
/// foreign checkpoint).
pub(crate) fn checkpoint_quantization(
    file: &Path,
    state: &kiln_trainer::checkpoint::TrainerState,
) -> Result<Option<QuantScheme>> {
    state
        .quantization
        .as_deref()
        .map(|text| {
            text.parse::<QuantScheme>().map_err(|reason| {
                RecipeError::Train(kiln_trainer::TrainError::Checkpoint {
                    path: file.to_path_buf(),
                    reason: format!("unknown quantization {text:?}: {reason}"),
                })
            })
        })
        .transpose()
}

/// The data settings the checkpoints of this run record: this run's, which must be those
/// recorded in the checkpoint being resumed. (A checkpoint from before kiln recorded them
/// continues on the data given.)
fn recorded_data(
    config: &CnnMnistConfig,
    resume: Option<&(PathBuf, kiln_trainer::checkpoint::Checkpoint)>,
) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let now = CnnMnistOptions {
        data: match &config.data {
            MnistSource::Embedded => None,
            MnistSource::Dir(dir) => Some(dir.clone()),
        },
        train_limit: config.train_limit,
    };
    let Some((file, checkpoint)) = resume else {
        return Ok(run_info::to_map(&now));
    };
    if checkpoint.state.options.is_empty() {
        return Ok(checkpoint.state.options.clone());
    }
    let recorded: CnnMnistOptions = run_info::from_map(&checkpoint.state.options, file, RECIPE)?;
    if recorded != now {
        return Err(RecipeError::Options {
            flag: "--resume",
            reason: format!(
                "the run in {} was trained on {}; resume it on the same data (this call has {})",
                run_dir_of(file).display(),
                recorded.describe(),
                now.describe()
            ),
        });
    }
    Ok(checkpoint.state.options.clone())
}

/// Fails unless the data set's images fit SimpleCNN.
pub(crate) fn check_image_shape(data: &dyn ImageDataset) -> Result<()> {
    let expected = SimpleCnn::input_shape();
    let found = data.image_shape();
    if found == expected {
        Ok(())
    } else {
        Err(RecipeError::ImageShape {
            model: ModelName::SimpleCnn.as_str(),
            found,
            expected,
        })
    }
}

/// The run directory a checkpoint file belongs to (`RUN/checkpoints/epoch-N.ckpt` -> `RUN`).
pub(crate) fn run_dir_of(checkpoint: &Path) -> PathBuf {
    let parent = checkpoint.parent().unwrap_or(Path::new("."));
    if parent
        .file_name()
        .is_some_and(|n| n == kiln_trainer::checkpoint::CHECKPOINT_DIR)
    {
        parent.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        parent.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;

    /// On one device the stages share the model's tensors: nothing is forked per step.
    #[test]
    fn stages_on_the_model_device_are_not_forked() {
        let device = Device::flex().autodiff();
        let model = SimpleCnnConfig::new().init(&device, 1);
        let (block, _) = model.conv_blocks();
        assert!(block.devices().iter().all(|d| *d == device));
        let stages = simple_cnn_stages(&model, 2, &[device.clone(), device.clone()]);
        assert!(stages.iter().all(|s| *s.device() == device));
    }
}
