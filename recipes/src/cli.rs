//! Command-line arguments of the recipes, shared by the `kiln` CLI and the recipe binaries so
//! that both accept exactly the same flags.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use kiln_models::ResNetDepth;
use kiln_models::gpt::{GptConfig, Sampling};
use kiln_models::quant::{Granularity, QuantBits, QuantScheme};
use kiln_multi::pipeline::PipelineSchedule;
use kiln_multi::{DeviceSpec, WorldSize, ZeroStage};
use kiln_trainer::checkpoint::{KeepBest, latest_checkpoint};
use kiln_trainer::report::Verbosity;

use crate::cnn_mnist::{
    CnnMnistConfig, OptimizerKind, OptimizerOverrides, PipelineOptions, RunTarget, ScheduleChoice,
    TrainerOverrides,
};
use crate::config_file::ConfigArgs;
use crate::error::Result;
use crate::finetune::FinetuneConfig;
use crate::gpt::{GenerateConfig, GptOptions, GptRecipeConfig};
use crate::inference::{ModelKind, ModelSource};
use crate::mnist_data::MnistSource;
use crate::quantize::QuantizeConfig;

/// Default parent of run directories.
const RUNS_DIR: &str = "runs";

/// Flags of `kiln train cnn-mnist` and of the `cnn-mnist` binary.
#[derive(Debug, Clone, Args)]
pub struct CnnMnistArgs {
    /// Total epochs to train [default: 5]. With --resume, training continues up to this epoch.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per SGD step [default: 64].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate (the schedule's peak) [default: 0.01].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the initialisation and of the per-epoch shuffles [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory of MNIST IDX files (train-images-idx3-ubyte[.gz], ...), e.g. the full 60k/10k
    /// set [default: the embedded 8,004/1,996 subset].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Output directory for checkpoints and metrics.jsonl [default: runs/cnn-mnist, or
    /// runs/cnn-mnist-N if that already holds a run].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue a run: from a checkpoint file or a run directory; with no value, from the
    /// latest checkpoint in --out. Hyper-parameters come from the checkpoint; only --epochs may
    /// change.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Train on the first N training samples only (quick checks).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Where to train: cpu (Burn's Flex backend, all cores), cuda:N (GPU N; plain `cuda`
    /// is cuda:0; needs a kiln built with `--features cuda`) or wgpu:N (graphics adapter N, any
    /// GPU vendor or Mesa's software lavapipe; `--features wgpu`). With --ranks R or
    /// --pipeline-stages P, the ranks or stages take consecutive GPUs from N (ranks exchange
    /// gradients over NCCL); under `kiln launch`, each process takes GPU N + its local rank.
    /// wgpu:N:shared puts every rank or stage on adapter N, each with a logical device of its
    /// own (multi-device runs on a machine with one adapter; for checking, not speed).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Data-parallel ranks: N threads, each with a replica of the model, training on 1/N of
    /// every batch and averaging gradients (like PyTorch DDP). --batch-size stays the global
    /// batch and must divide by N. A run may be resumed with a different N. For one process
    /// per rank (and several hosts), see `kiln launch`.
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::MIN)]
    pub ranks: NonZeroUsize,
    /// Seconds a rank waits for the others at a gradient exchange before the run fails
    /// (with --ranks above 1, or under `kiln launch`, where the whole job is stopped).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub collective_timeout: u64,
    /// Shard over the data-parallel ranks (like DeepSpeed ZeRO / PyTorch's
    /// ZeroRedundancyOptimizer): 1 splits the optimizer state (momentum), 2 also the
    /// synchronised gradients; each rank updates its shard and the parameters are all-gathered.
    /// Same updates as plain data parallelism. Needs --ranks N or `kiln launch`; --json reports
    /// the bytes per rank. Checkpoints hold the whole state: a run resumes with or without it.
    #[arg(long, value_name = "STAGE", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub zero: Option<u8>,
    /// Tensor parallelism (Megatron-style): SimpleCNN's classifier split over N ranks
    /// (threads, or consecutive GPUs with --device cuda:K): fc1's 128 outputs by columns, fc2's
    /// inputs by rows, the partial logits all-reduced; every rank sees the same batches and
    /// holds 1/N of the classifier's weights and momentum. Same updates as one device.
    /// Checkpoints hold the whole model and its whole optimizer state (eval, predict and
    /// quantize read them as usual; --resume continues on any number of ranks, or one).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=128))]
    pub tensor_parallel: Option<u32>,
    /// Pipeline parallelism: split SimpleCNN into 2 stages (conv1 | conv2 + classifier) or 3
    /// (conv1 | conv2 | classifier), each on its own thread with its share of the cores, and
    /// stream micro-batches through them. Same updates as one device.
    #[arg(long, value_name = "N")]
    pub pipeline_stages: Option<NonZeroUsize>,
    /// Micro-batches each batch is split into for the pipeline.
    #[arg(long, value_name = "M", default_value_t = NonZeroUsize::new(4).expect("4 is not zero"), requires = "pipeline_stages")]
    pub micro_batches: NonZeroUsize,
    /// Pipeline schedule: naive (whole batch, stages wait for each other), gpipe (all
    /// forwards, then all backwards) or 1f1b (one forward one backward: fewer activations held).
    #[arg(long, value_enum, default_value_t = ScheduleArg::OneFOneB, requires = "pipeline_stages")]
    pub schedule: ScheduleArg,
    /// Quantization-aware training: every forward pass uses the Linear and Conv2d weights
    /// rounded to this integer width (gradients pass straight through to the float weights),
    /// so the model learns to live with the rounding. Convert the result with `kiln quantize
    /// --checkpoint RUN`. On --resume the checkpoint's setting is kept.
    #[arg(long, value_enum, value_name = "BITS")]
    pub qat: Option<BitsArg>,
    /// Weights sharing one scale under --qat: tensor, channel (per output channel) or
    /// block:N (N consecutive weights of a channel).
    #[arg(long, value_name = "G", default_value = "tensor", requires = "qat", value_parser = parse_granularity)]
    pub qat_granularity: Granularity,
    /// Optimizer, schedule, clipping and accumulation.
    #[command(flatten)]
    pub optimizer: OptimizerArgs,
    /// `--config FILE` and `--print-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// The optimizer, schedule, clipping and accumulation flags, shared by `kiln train` and
/// `kiln finetune`. Unset, a fresh run takes the recipe's default (SGD with momentum 0.9,
/// constant rate) and a resumed run its checkpoint's.
#[derive(Debug, Clone, Args)]
pub struct OptimizerArgs {
    /// The optimizer: sgd (momentum 0.9), adam (betas 0.9/0.999) or adamw (weight decay 0.01).
    #[arg(long, value_enum, help_heading = "Optimizer")]
    pub optimizer: Option<OptimizerArg>,
    /// SGD's momentum, in [0, 1).
    #[arg(long, value_name = "M", help_heading = "Optimizer")]
    pub momentum: Option<f64>,
    /// SGD with Nesterov momentum.
    #[arg(long, help_heading = "Optimizer")]
    pub nesterov: bool,
    /// Weight decay: an L2 penalty for sgd and adam, decoupled for adamw.
    #[arg(long, value_name = "W", help_heading = "Optimizer")]
    pub weight_decay: Option<f32>,
    /// The learning-rate schedule: constant; step (times --lr-gamma every --lr-step-every
    /// steps); or cosine (linear warm-up over --warmup-steps, then a half cosine down to
    /// --min-lr at the run's last step; a resumed run keeps the schedule it was started with).
    #[arg(long, value_enum, help_heading = "Optimizer")]
    pub lr_schedule: Option<ScheduleKindArg>,
    /// Optimizer steps of linear warm-up before the cosine.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        requires = "lr_schedule",
        help_heading = "Optimizer"
    )]
    pub warmup_steps: u64,
    /// The cosine's final learning rate.
    #[arg(
        long,
        value_name = "LR",
        default_value_t = 0.0,
        requires = "lr_schedule",
        help_heading = "Optimizer"
    )]
    pub min_lr: f64,
    /// Optimizer steps between two decays of the step schedule.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        requires = "lr_schedule",
        help_heading = "Optimizer"
    )]
    pub lr_step_every: u64,
    /// The step schedule's factor per decay, in (0, 1].
    #[arg(
        long,
        value_name = "G",
        default_value_t = 0.1,
        requires = "lr_schedule",
        help_heading = "Optimizer"
    )]
    pub lr_gamma: f64,
    /// Clip each step's (averaged) gradient to this global L2 norm, as PyTorch's
    /// clip_grad_norm_.
    #[arg(long, value_name = "NORM", help_heading = "Optimizer")]
    pub clip_grad_norm: Option<f64>,
    /// Average the gradients of N batches into each optimizer step (gradient accumulation):
    /// the effective batch is --batch-size x N.
    #[arg(long, value_name = "N", help_heading = "Optimizer")]
    pub accumulation_steps: Option<NonZeroUsize>,
    /// How often checkpoints are written and which stay.
    #[command(flatten)]
    pub checkpoints: CheckpointArgs,
}

/// The checkpoint flags of `kiln train` and `kiln finetune`. Unset, a fresh run keeps the
/// last 5 epochs' checkpoints and the best one, and a resumed run its checkpoint's settings.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// Also write a checkpoint every N optimizer steps inside an epoch, so that a killed or
    /// preempted run loses at most N steps; the latest one is kept, each epoch's end has its
    /// own. --resume continues from it exactly as if never stopped (on as many ranks).
    /// SIGTERM or Ctrl-C always stop the run after the current step (with several ranks,
    /// within 4 steps, where they agree), with a checkpoint there.
    #[arg(long, value_name = "N", help_heading = "Checkpoints")]
    pub checkpoint_every: Option<std::num::NonZeroU64>,
    /// Keep the checkpoints of the last N epochs (and the best, see --keep-best); 0 keeps
    /// every epoch's [default: 5].
    #[arg(long, value_name = "N", help_heading = "Checkpoints")]
    pub keep_last: Option<usize>,
    /// Also keep the best epoch's checkpoint by a validation figure: auto (accuracy where the
    /// run reports it, else loss), max:NAME, min:NAME (e.g. min:mae), or none [default: auto].
    #[arg(long, value_name = "BY", value_parser = parse_keep_best, help_heading = "Checkpoints")]
    pub keep_best: Option<KeepBest>,
    /// Write each checkpoint before training goes on, instead of on a background thread
    /// while the next steps run (the default; a crash mid-write keeps the previous one).
    #[arg(long, help_heading = "Checkpoints")]
    pub sync_checkpoints: bool,
}

fn parse_keep_best(text: &str) -> std::result::Result<KeepBest, String> {
    text.parse()
}

impl OptimizerArgs {
    /// These flags over epochs, batch size, learning rate and seed.
    fn overrides(
        &self,
        epochs: Option<usize>,
        batch_size: Option<usize>,
        lr: Option<f64>,
        seed: Option<u64>,
    ) -> TrainerOverrides {
        TrainerOverrides {
            epochs,
            batch_size,
            lr,
            seed,
            optimizer: OptimizerOverrides {
                kind: self.optimizer.map(|o| match o {
                    OptimizerArg::Sgd => OptimizerKind::Sgd,
                    OptimizerArg::Adam => OptimizerKind::Adam,
                    OptimizerArg::Adamw => OptimizerKind::AdamW,
                }),
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
            },
            schedule: self.lr_schedule.map(|s| match s {
                ScheduleKindArg::Constant => ScheduleChoice::Constant,
                ScheduleKindArg::Step => ScheduleChoice::Step {
                    every: self.lr_step_every,
                    gamma: self.lr_gamma,
                },
                ScheduleKindArg::Cosine => ScheduleChoice::Cosine {
                    warmup_steps: self.warmup_steps,
                    min_lr: self.min_lr,
                },
            }),
            clip_grad_norm: self.clip_grad_norm,
            accumulation_steps: self.accumulation_steps,
            checkpoint_every: self.checkpoints.checkpoint_every,
            keep_last: self.checkpoints.keep_last.map(NonZeroUsize::new),
            keep_best: self.checkpoints.keep_best.clone(),
            sync_checkpoints: self.checkpoints.sync_checkpoints,
        }
    }
}

/// Optimizers on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// SGD with momentum.
    Sgd,
    /// Adam.
    Adam,
    /// AdamW (decoupled weight decay).
    Adamw,
}

/// Learning-rate schedules on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKindArg {
    /// The base rate throughout.
    Constant,
    /// Decay by a factor every N steps.
    Step,
    /// Linear warm-up, then cosine decay.
    Cosine,
}

/// Integer widths on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BitsArg {
    /// 8-bit integers (scale = max|w| / 127).
    Int8,
    /// 4-bit integers (scale = max|w| / 7), two per byte.
    Int4,
}

impl From<BitsArg> for QuantBits {
    fn from(arg: BitsArg) -> Self {
        match arg {
            BitsArg::Int8 => QuantBits::Int8,
            BitsArg::Int4 => QuantBits::Int4,
        }
    }
}

/// Parses `tensor`, `channel` or `block:N`.
fn parse_granularity(text: &str) -> std::result::Result<Granularity, String> {
    text.parse()
}

/// Pipeline schedules on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// The whole batch through each stage in turn.
    Naive,
    /// All micro-batches forward, then all backward.
    Gpipe,
    /// One forward, one backward, after a warm-up.
    #[value(name = "1f1b")]
    OneFOneB,
}

impl From<ScheduleArg> for PipelineSchedule {
    fn from(arg: ScheduleArg) -> Self {
        match arg {
            ScheduleArg::Naive => PipelineSchedule::Naive,
            ScheduleArg::Gpipe => PipelineSchedule::GPipe,
            ScheduleArg::OneFOneB => PipelineSchedule::OneFOneB,
        }
    }
}

/// `--mesh dp=D,tp=T,pp=P`: ranks along each axis of the device mesh, in any order; an axis
/// left out has one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshArg {
    /// `dp`: data-parallel replicas.
    pub data: NonZeroUsize,
    /// `tp`: tensor-parallel ranks per replica.
    pub tensor: NonZeroUsize,
    /// `pp`: pipeline stages.
    pub pipeline: NonZeroUsize,
}

impl std::str::FromStr for MeshArg {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut axes = [None::<NonZeroUsize>; 3];
        for part in text.split(',') {
            let Some((name, count)) = part.split_once('=') else {
                return Err(format!(
                    "`{part}` is not AXIS=N (axes dp, tp, pp; e.g. dp=2,tp=2)"
                ));
            };
            let axis = match name.trim() {
                "dp" => 0,
                "tp" => 1,
                "pp" => 2,
                other => {
                    return Err(format!(
                        "unknown axis `{other}`: the axes are dp, tp and pp"
                    ));
                }
            };
            let count = count.trim().parse::<NonZeroUsize>().map_err(|_| {
                format!("{name}={count}: the count must be a whole number of 1 or more")
            })?;
            if axes[axis].replace(count).is_some() {
                return Err(format!("axis {name} is given twice"));
            }
        }
        let [data, tensor, pipeline] = axes.map(|n| n.unwrap_or(NonZeroUsize::MIN));
        Ok(Self {
            data,
            tensor,
            pipeline,
        })
    }
}

impl CnnMnistArgs {
    /// The recipe configuration these flags describe.
    ///
    /// # Errors
    /// Fails when the default run directory cannot be inspected.
    pub fn to_config(&self, verbosity: Verbosity) -> Result<CnnMnistConfig> {
        let target = run_target(&self.resume, &self.out, crate::cnn_mnist::RECIPE)?;
        Ok(CnnMnistConfig {
            overrides: self
                .optimizer
                .overrides(self.epochs, self.batch_size, self.lr, self.seed),
            data: MnistSource::from_option(self.data.as_deref()),
            target,
            verbosity,
            train_limit: self.limit,
            ranks: WorldSize::new(self.ranks.get()).map_err(kiln_trainer::TrainError::from)?,
            collective_timeout: Duration::from_secs(self.collective_timeout),
            pipeline: self.pipeline_stages.map(|stages| PipelineOptions {
                stages,
                micro_batches: self.micro_batches,
                schedule: self.schedule.into(),
            }),
            process_group: None,
            device: self.device,
            tensor_parallel: self
                .tensor_parallel
                .map(|n| WorldSize::new(n as usize))
                .transpose()
                .map_err(kiln_trainer::TrainError::from)?,
            zero: self.zero.map(|stage| {
                if stage == 1 {
                    ZeroStage::One
                } else {
                    ZeroStage::Two
                }
            }),
            qat: self.qat.map(|bits| QuantScheme {
                bits: bits.into(),
                granularity: self.qat_granularity,
            }),
            run_config: None,
        })
    }
}

/// What `--resume [PATH]` and `--out DIR` ask for, for the recipe `name`: continue the given
/// checkpoint or run (`--out`'s, else `runs/NAME`), or start fresh in `--out` or a new
/// `runs/NAME[-N]`.
fn run_target(
    resume: &Option<Option<PathBuf>>,
    out: &Option<PathBuf>,
    name: &str,
) -> Result<RunTarget> {
    let (attempt, max_restarts) = crate::distributed::launch_restarts();
    if max_restarts > 0 && resume.is_none() {
        // A restarted job continues from the checkpoints its earlier attempt left.
        let Some(out) = out else {
            return Err(crate::RecipeError::Options {
                flag: "--out",
                reason: "kiln launch --max-restarts restarts the job from its checkpoints, \
                         which must be where every attempt finds them: give the job --out DIR"
                    .into(),
            });
        };
        if attempt > 0 && latest_checkpoint(out)?.is_some() {
            return Ok(RunTarget::Resume(out.clone()));
        }
    }
    Ok(match (resume, out) {
        (Some(Some(path)), _) => RunTarget::Resume(path.clone()),
        (Some(None), Some(out)) => RunTarget::Resume(out.clone()),
        (Some(None), None) => RunTarget::Resume(Path::new(RUNS_DIR).join(name)),
        (None, Some(out)) => RunTarget::Fresh(out.clone()),
        (None, None) => RunTarget::Fresh(fresh_run_dir(name)?),
    })
}

/// `runs/NAME`, or the first `runs/NAME-N` that holds no run yet, so that running the same
/// command twice never overwrites a finished run.
fn fresh_run_dir(name: &str) -> Result<PathBuf> {
    let base = Path::new(RUNS_DIR);
    let mut candidate = base.join(name);
    let mut n = 2;
    while latest_checkpoint(&candidate)?.is_some() {
        candidate = base.join(format!("{name}-{n}"));
        n += 1;
    }
    Ok(candidate)
}

/// Model architectures on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// SimpleCNN (conv1, conv2, fc1, fc2), as in PyTorch's MNIST tutorial.
    SimpleCnn,
    /// torchvision's resnet18 (state_dict names as torchvision saves them).
    Resnet18,
    /// torchvision's resnet34.
    Resnet34,
    /// torchvision's resnet50.
    Resnet50,
}

impl ModelArg {
    /// The architecture, with `num_classes` outputs for the ResNets.
    fn kind(self, num_classes: usize) -> ModelKind {
        let resnet = |depth| ModelKind::ResNet { depth, num_classes };
        match self {
            ModelArg::SimpleCnn => ModelKind::SimpleCnn,
            ModelArg::Resnet18 => resnet(ResNetDepth::R18),
            ModelArg::Resnet34 => resnet(ResNetDepth::R34),
            ModelArg::Resnet50 => resnet(ResNetDepth::R50),
        }
    }
}

/// Where `eval` and `predict` take the model from: a checkpoint, or PyTorch weights.
#[derive(Debug, Clone, Args)]
pub struct ModelSourceArgs {
    /// Kiln checkpoint file, or a run directory (its latest checkpoint).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["model", "weights"], required_unless_present = "weights")]
    pub checkpoint: Option<PathBuf>,
    /// Architecture of --weights.
    #[arg(long, value_enum, requires = "weights")]
    pub model: Option<ModelArg>,
    /// PyTorch state_dict as .pth/.pt or .safetensors, with the architecture's PyTorch
    /// parameter names (SimpleCNN: conv1, conv2, fc1, fc2; ResNets: torchvision's).
    #[arg(long, value_name = "FILE", requires = "model")]
    pub weights: Option<PathBuf>,
    /// Outputs of a ResNet's fc layer in --weights (1000 for torchvision's ImageNet weights).
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::new(1000).expect("1000 is not zero"))]
    pub num_classes: NonZeroUsize,
    /// Where the model runs: cpu, cuda:N (a build with `--features cuda`) or wgpu:N (a build
    /// with `--features wgpu`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
}

impl ModelSourceArgs {
    /// The model source these flags name, or `None` when neither `--checkpoint` nor
    /// `--model` with `--weights` was given (clap's argument rules already prevent that).
    pub fn to_source(&self) -> Option<ModelSource> {
        match (&self.checkpoint, self.model, &self.weights) {
            (Some(path), _, _) => Some(ModelSource::Checkpoint(path.clone())),
            (None, Some(model), Some(path)) => Some(ModelSource::Weights {
                model: model.kind(self.num_classes.get()),
                path: path.clone(),
            }),
            _ => None,
        }
    }
}

/// Flags of `kiln quantize`.
#[derive(Debug, Clone, Args)]
pub struct QuantizeArgs {
    /// The float model to quantize.
    #[command(flatten)]
    pub source: ModelSourceArgs,
    /// Integer width of the weights [default: the checkpoint's --qat width, else int8].
    #[arg(long, value_enum, value_name = "BITS")]
    pub scheme: Option<BitsArg>,
    /// Weights sharing one scale: tensor, channel or block:N [default: the checkpoint's
    /// --qat-granularity, else tensor].
    #[arg(long, value_name = "G", value_parser = parse_granularity)]
    pub granularity: Option<Granularity>,
    /// How weight scales are chosen: minmax (max |w| of each group).
    #[arg(long, value_enum, default_value_t = CalibrationArg::Minmax)]
    pub calibration: CalibrationArg,
    /// How int8 files (per tensor or per channel) quantize activations on kiln's integer
    /// path (SimpleCNN, and fine-tuned ResNets with their BatchNorms folded into the
    /// convolutions): static (ranges calibrated on training images, MNIST's or the fine-tuning
    /// data's, stored in the file), dynamic (measured on every batch), or float (weights only:
    /// the file runs in float32 on dequantized weights, as PyTorch's weight-only quantizers
    /// do). int4 and block-wise files always run in float32.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ActivationsArg::Static)]
    pub activations: ActivationsArg,
    /// Batches of 32 training images that static activation ranges are calibrated on.
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::new(32).expect("32 is not zero"))]
    pub calibration_batches: NonZeroUsize,
    /// Quantized SafeTensors file to write [default: RUN/simple-cnn-SCHEME.safetensors next
    /// to the checkpoint]. An earlier quantized file is replaced; any other file is refused.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Directory of MNIST IDX files for the comparison [default: the embedded subset].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Timed batches of 256 per model for the throughput figures (and ten times as many
    /// single-sample passes for the latency).
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::new(20).expect("20 is not zero"))]
    pub timing_batches: NonZeroUsize,
    /// `--config FILE` and `--print-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `--activations` of `kiln quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActivationsArg {
    /// Ranges calibrated once on training images and stored in the file (fastest).
    Static,
    /// Ranges measured on every batch.
    Dynamic,
    /// Activations stay float32 (weight-only quantization, float path).
    Float,
}

/// Calibration methods on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CalibrationArg {
    /// Symmetric scales from each group's largest |weight|.
    Minmax,
}

impl QuantizeArgs {
    /// The recipe configuration these flags describe, or `None` when no model was named.
    pub fn to_config(&self) -> Option<QuantizeConfig> {
        let mut config = QuantizeConfig::new(
            self.source.to_source()?,
            MnistSource::from_option(self.data.as_deref()),
        );
        config.bits = self.scheme.map(QuantBits::from);
        config.granularity = self.granularity;
        config.out = self.out.clone();
        config.throughput_batches = self.timing_batches;
        config.activations = match self.activations {
            ActivationsArg::Static => crate::quantize::ActivationMode::Static,
            ActivationsArg::Dynamic => crate::quantize::ActivationMode::Dynamic,
            ActivationsArg::Float => crate::quantize::ActivationMode::Float,
        };
        config.calibration_batches = self.calibration_batches;
        config.latency_samples = self
            .timing_batches
            .saturating_mul(NonZeroUsize::new(10).expect("10 is not zero"));
        Some(config)
    }
}

/// The demo image folder shipped with kiln (data/digits: MNIST digits as PNGs).
pub fn demo_image_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits")
}

/// ResNet depths on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResNetArg {
    /// torchvision's resnet18.
    Resnet18,
    /// torchvision's resnet34.
    Resnet34,
    /// torchvision's resnet50.
    Resnet50,
}

/// Flags of `kiln finetune`.
#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// Architecture.
    #[arg(long, value_enum, default_value_t = ResNetArg::Resnet18)]
    pub model: ResNetArg,
    /// Pretrained weights: a torchvision state_dict (.pth/.pt or .safetensors), e.g.
    /// resnet18-f37072fd.pth. Its fc layer is replaced by a new head for the data's classes.
    /// Without it the network starts from a fresh initialisation.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Accept weights with missing or extra tensors (listed in --json); shapes must still fit.
    #[arg(long, requires = "weights")]
    pub allow_partial: bool,
    /// Image folder: DIR/train/CLASS/*.png|jpg and DIR/val/CLASS/*.png|jpg, one
    /// sub-directory per class; or CIFAR-10's binary directory (data_batch_1.bin ...
    /// test_batch.bin, used at 32x32) [default: the demo set data/digits shipped with kiln].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Number of classes expected; an error if the data has another number.
    #[arg(long, value_name = "N")]
    pub num_classes: Option<usize>,
    /// Train the new head only: the backbone gets no gradients and no optimizer state, and
    /// its BatchNorm layers keep their running statistics.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Side of the square images the network sees: training takes random resized crops,
    /// validation resizes to SIZE*256/224 and takes the centre crop (torchvision's recipe).
    #[arg(long, value_name = "SIZE", default_value_t = 224)]
    pub image_size: usize,
    /// Train on centre crops, without random crops and flips.
    #[arg(long)]
    pub no_augment: bool,
    /// Total epochs [default: 3]. With --resume, training continues up to this epoch.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per SGD step [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate (the schedule's peak) of the new head, and of the backbone unless
    /// --backbone-lr is given [default: 0.01].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the backbone (everything but fc), e.g. a tenth of --lr so that the
    /// pretrained features move less than the new head (PyTorch's parameter groups).
    #[arg(long, value_name = "LR", conflicts_with = "freeze_backbone")]
    pub backbone_lr: Option<f64>,
    /// Seed of the new head, the shuffles and the augmentation [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory [default: runs/finetune, or runs/finetune-N if that holds a run].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue a run from a checkpoint file or run directory (with no value: --out's).
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Where to train: cpu, cuda:N (GPU N; needs a kiln built with `--features cuda`) or
    /// wgpu:N (graphics adapter N; `--features wgpu`).
    /// With --ranks R, the ranks take R consecutive GPUs from N and exchange over NCCL.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Data-parallel ranks (threads, each with a replica, averaging gradients).
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::MIN)]
    pub ranks: NonZeroUsize,
    /// Seconds a rank waits for the others before the run fails.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub collective_timeout: u64,
    /// Optimizer, schedule, clipping and accumulation.
    #[command(flatten)]
    pub optimizer: OptimizerArgs,
    /// `--config FILE` and `--print-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

impl FinetuneArgs {
    /// The recipe configuration these flags describe.
    ///
    /// # Errors
    /// Fails when the default run directory cannot be inspected.
    pub fn to_config(&self, verbosity: Verbosity) -> Result<FinetuneConfig> {
        let target = run_target(&self.resume, &self.out, crate::finetune::RECIPE)?;
        Ok(FinetuneConfig {
            depth: match self.model {
                ResNetArg::Resnet18 => ResNetDepth::R18,
                ResNetArg::Resnet34 => ResNetDepth::R34,
                ResNetArg::Resnet50 => ResNetDepth::R50,
            },
            weights: self.weights.clone(),
            allow_partial: self.allow_partial,
            data: self.data.clone().unwrap_or_else(demo_image_folder),
            num_classes: self.num_classes,
            freeze_backbone: self.freeze_backbone,
            image_size: self.image_size,
            augment: !self.no_augment,
            overrides: self
                .optimizer
                .overrides(self.epochs, self.batch_size, self.lr, self.seed),
            backbone_lr: self.backbone_lr,
            target,
            verbosity,
            ranks: WorldSize::new(self.ranks.get()).map_err(kiln_trainer::TrainError::from)?,
            collective_timeout: Duration::from_secs(self.collective_timeout),
            device: self.device,
            run_config: None,
        })
    }
}

/// Flags of `kiln train gpt`.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("pipeline").args(["pipeline_stages", "mesh"]).multiple(true))]
pub struct GptArgs {
    /// Total epochs (passes over the training windows) [default: 3]. With --resume, training
    /// continues up to this epoch.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Windows (of --block-size tokens) per optimizer step [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 2e-3; the cosine ends at a tenth of it].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the initialisation and of the per-epoch shuffles [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// A text file to train on: its bytes are the tokens, the last --validation of it
    /// validates [default: the embedded Tiny Shakespeare, 1.1 MB].
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Share of the text, taken from its end, that validates.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub validation: f64,
    /// Transformer blocks.
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Model")]
    pub layers: usize,
    /// Attention heads per block (they divide --embed).
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Model")]
    pub heads: usize,
    /// Width of the residual stream.
    #[arg(long, value_name = "N", default_value_t = 128, help_heading = "Model")]
    pub embed: usize,
    /// Tokens of context (each training window holds this many inputs).
    #[arg(long, value_name = "N", default_value_t = 64, help_heading = "Model")]
    pub block_size: usize,
    /// Give the LM head weights of its own instead of sharing the token embedding's.
    #[arg(long, help_heading = "Model")]
    pub untied_head: bool,
    /// Output directory for checkpoints and metrics.jsonl [default: runs/gpt, or runs/gpt-N
    /// if that already holds a run].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue a run: from a checkpoint file or a run directory; with no value, from the
    /// latest checkpoint in --out. The model and data come from the checkpoint.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Train on the first N windows only (quick checks).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Where to train: cpu, cuda:N (a build with `--features cuda`) or wgpu:N
    /// (`--features wgpu`); ranks and stages take consecutive devices from N, or all share
    /// adapter N with wgpu:N:shared.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Data-parallel ranks (threads), each on 1/N of every batch, gradients averaged. With
    /// --tensor-parallel or --pipeline-stages: that many replicas of the split model.
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::MIN)]
    pub ranks: NonZeroUsize,
    /// Seconds a rank waits for the others at a gradient exchange.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub collective_timeout: u64,
    /// Shard the optimizer state (1) and the gradients (2) over the data-parallel ranks; on a
    /// mesh with tensor parallelism, each part's over its data-parallel replicas. Checkpoints
    /// hold the whole state, so a run resumes with or without --zero, on any mesh.
    #[arg(long, value_name = "STAGE", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub zero: Option<u8>,
    /// Tensor parallelism (Megatron): every block split over N ranks (threads), each holding
    /// 1/N of the heads (their Q, K, V and output-projection rows) and of the MLP, with one
    /// all-reduce per attention and per MLP in the forward and one in the backward; embeddings,
    /// LayerNorms and the head replicated. Every rank of a group sees the same batches; the
    /// same updates as one device; --ranks D trains D such groups as data-parallel replicas
    /// (D x N threads). --heads and 4 x --embed must divide by N. Checkpoints hold the whole
    /// model and optimizer state, a single device's file: generate reads them, and --resume
    /// continues on any layout (another N, --ranks, one device) as the run would have.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=128))]
    pub tensor_parallel: Option<u32>,
    /// Pipeline parallelism: the blocks split into N stages of equal size (the embeddings in
    /// the first, the final norm and head in the last), each on its own thread with its share
    /// of the cores, micro-batches streamed through them. Same updates as one device.
    /// --layers must divide by N.
    #[arg(long, value_name = "N")]
    pub pipeline_stages: Option<NonZeroUsize>,
    /// The device mesh in one flag, instead of --ranks, --tensor-parallel and
    /// --pipeline-stages: `dp=D,tp=T,pp=P` (axes in any order, a missing one is 1), e.g.
    /// `--mesh dp=2,tp=2` (4 threads), `--mesh dp=2,tp=2,pp=2` (4 ranks of 2 stage threads).
    /// Every combination runs in threads (tp x pp on the CPU only), and under kiln launch
    /// (dp x tp processes, each rank's pipeline stages its threads).
    #[arg(long, value_name = "dp=D,tp=T,pp=P", conflicts_with_all = ["ranks", "tensor_parallel", "pipeline_stages"])]
    pub mesh: Option<MeshArg>,
    /// Micro-batches each batch is split into for the pipeline.
    #[arg(long, value_name = "M", default_value_t = NonZeroUsize::new(4).expect("4 is not zero"), requires = "pipeline")]
    pub micro_batches: NonZeroUsize,
    /// Pipeline schedule: naive, gpipe or 1f1b.
    #[arg(long, value_enum, default_value_t = ScheduleArg::OneFOneB, requires = "pipeline")]
    pub schedule: ScheduleArg,
    /// Optimizer (AdamW with weight decay 0.1 by default), schedule (warm-up over 50 steps,
    /// then cosine), clipping (norm 1) and accumulation.
    #[command(flatten)]
    pub optimizer: OptimizerArgs,
    /// `--config FILE` and `--print-config`.
    #[command(flatten)]
    pub config: ConfigArgs,
}

impl GptArgs {
    /// The recipe configuration these flags describe.
    ///
    /// # Errors
    /// Fails when the default run directory cannot be inspected.
    pub fn to_config(&self, verbosity: Verbosity) -> Result<GptRecipeConfig> {
        let target = run_target(&self.resume, &self.out, crate::gpt::RECIPE)?;
        let (ranks, tensor, stages) = self.mesh_axes()?;
        Ok(GptRecipeConfig {
            options: GptOptions {
                model: GptConfig {
                    vocab_size: kiln_trainer::data::BYTE_VOCAB,
                    block_size: self.block_size,
                    layers: self.layers,
                    heads: self.heads,
                    embed: self.embed,
                    tied_head: !self.untied_head,
                },
                data: self.data.clone(),
                validation: self.validation,
                train_limit: self.limit,
            },
            overrides: self
                .optimizer
                .overrides(self.epochs, self.batch_size, self.lr, self.seed),
            target,
            verbosity,
            ranks: WorldSize::new(ranks.get()).map_err(kiln_trainer::TrainError::from)?,
            zero: self.zero.map(|stage| match stage {
                1 => ZeroStage::One,
                _ => ZeroStage::Two,
            }),
            tensor_parallel: tensor
                .map(|n| WorldSize::new(n.get()))
                .transpose()
                .map_err(kiln_trainer::TrainError::from)?,
            pipeline: stages.map(|stages| PipelineOptions {
                stages,
                micro_batches: self.micro_batches,
                schedule: self.schedule.into(),
            }),
            collective_timeout: Duration::from_secs(self.collective_timeout),
            device: self.device,
            process_group: None,
            run_config: None,
        })
    }
}

impl GptArgs {
    /// Data-parallel ranks, tensor-parallel ranks and pipeline stages, from --mesh or from
    /// the separate flags (an axis of one rank is no split).
    fn mesh_axes(&self) -> Result<(NonZeroUsize, Option<NonZeroUsize>, Option<NonZeroUsize>)> {
        let tensor = self
            .tensor_parallel
            .and_then(|n| NonZeroUsize::new(n as usize));
        let Some(mesh) = self.mesh else {
            return Ok((self.ranks, tensor, self.pipeline_stages));
        };
        let split = |n: NonZeroUsize| (n.get() > 1).then_some(n);
        if mesh.pipeline.get() == 1
            && (self.micro_batches.get() != 4 || self.schedule != ScheduleArg::OneFOneB)
        {
            return Err(crate::RecipeError::Options {
                flag: "--micro-batches/--schedule",
                reason: "they set up a pipeline: give --mesh a pp axis of 2 or more".into(),
            });
        }
        Ok((mesh.data, split(mesh.tensor), split(mesh.pipeline)))
    }
}

/// Flags of `kiln generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A `kiln train gpt` checkpoint, or its run directory (the latest checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long, value_name = "TEXT", default_value = "\n")]
    pub prompt: String,
    /// Tokens (bytes) to add.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub tokens: usize,
    /// Sampling temperature: below 1 more conservative, above 1 more varied; 0 always takes
    /// the most likely byte.
    #[arg(long, value_name = "T", default_value_t = 0.8)]
    pub temperature: f32,
    /// Draw only from the K most likely bytes (0: from all).
    #[arg(long, value_name = "K", default_value_t = 40)]
    pub top_k: usize,
    /// Seed of the draws: the same seed and prompt give the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Recompute the whole context at every step instead of caching keys and values (the
    /// same text, slower: a check of the cache).
    #[arg(long)]
    pub no_cache: bool,
    /// Where the model runs: cpu, cuda:N or wgpu:N.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
}

impl GenerateArgs {
    /// The sampling these flags ask for.
    ///
    /// # Errors
    /// [`crate::RecipeError::Options`] for a negative or non-finite temperature.
    pub fn to_config(&self) -> Result<GenerateConfig> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(crate::RecipeError::Options {
                flag: "--temperature",
                reason: format!("must be 0 or above, got {}", self.temperature),
            });
        }
        Ok(GenerateConfig {
            checkpoint: self.checkpoint.clone(),
            prompt: self.prompt.clone(),
            tokens: self.tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: (self.top_k > 0).then_some(self.top_k),
                seed: self.seed,
            },
            no_cache: self.no_cache,
            device: self.device,
        })
    }
}
