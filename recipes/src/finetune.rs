//! The finetune recipe: a torchvision ResNet (18/34/50) with its head replaced for the classes
//! of an image folder, optionally from PyTorch weights and with the backbone frozen, trained
//! with SGD momentum by the kiln trainer (checkpoints, resume, data parallelism), then saved
//! as SafeTensors with torchvision's names.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::module::Module;
use burn::tensor::Device;
use kiln_models::quant::file::float_safetensors;
use kiln_models::{LoadOptions, ResNet, ResNetDepth, load_weights_with};
use kiln_multi::{DeviceSpec, WorldSize};
use kiln_trainer::checkpoint::Checkpoint;
use kiln_trainer::data::{
    Augment, CIFAR10_CLASSES, Cifar10, CifarSplit, ImageDataset, ImageFolder,
};
use kiln_trainer::report::Verbosity;
use kiln_trainer::{
    Execution, FitReport, LrGroup, RunLabels, TrainData, Trainer, TrainerConfig, evaluate,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cnn_mnist::{RunTarget, TrainerOverrides};
use crate::config_file::{ResolvedConfig, write_run_config};
use crate::error::{RecipeError, Result};
use crate::report::FinetuneReport;
use crate::run_info::{self, ModelName};

/// Name of this recipe, recorded in checkpoints.
pub const RECIPE: &str = "finetune";
/// Path prefix of the classifier head's parameters.
const HEAD_PREFIX: &str = "fc.";
/// File name of the fine-tuned weights written into the run directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Configuration of `kiln finetune`.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// Architecture.
    pub depth: ResNetDepth,
    /// Pretrained weights (torchvision `state_dict`, `.pth` or `.safetensors`); their `fc` is
    /// replaced. `None` starts from kiln's initialisation.
    pub weights: Option<PathBuf>,
    /// Load weights that lack tensors or have extra ones (listed on stderr).
    pub allow_partial: bool,
    /// Data directory: `DIR/train/CLASS/*.png|jpg` and `DIR/val/CLASS/*.png|jpg`, or
    /// CIFAR-10's binary batches (`data_batch_N.bin`, `test_batch.bin`).
    pub data: PathBuf,
    /// Expected number of classes; the data decides when `None`.
    pub num_classes: Option<usize>,
    /// Train the head only.
    pub freeze_backbone: bool,
    /// Side of the square images the network sees.
    pub image_size: usize,
    /// Random resized crops and flips in training.
    pub augment: bool,
    /// Hyper-parameters given by the user; `lr` is the head's (and the backbone's, unless
    /// `backbone_lr` is set).
    pub overrides: TrainerOverrides,
    /// Learning rate of everything but the head.
    pub backbone_lr: Option<f64>,
    /// Output directory, or the run to resume.
    pub target: RunTarget,
    /// What is printed on stderr.
    pub verbosity: Verbosity,
    /// Data-parallel ranks (threads).
    pub ranks: WorldSize,
    /// How long a rank waits for the others.
    pub collective_timeout: Duration,
    /// The device of rank 0; further ranks take the next GPUs.
    pub device: DeviceSpec,
    /// The resolved flags to write into the run directory as `config.toml` (the CLI sets
    /// it; `None` writes none), completed with the trainer settings the run resolves.
    pub run_config: Option<ResolvedConfig>,
}

/// The recipe's defaults: 3 epochs, batch 32, lr 0.01, momentum 0.9.
pub fn default_trainer_config() -> TrainerConfig {
    TrainerConfig {
        epochs: 3,
        batch_size: 32,
        eval_batch_size: 64,
        ..TrainerConfig::default()
    }
}

/// Settings recorded in the checkpoint that rebuild the model and its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FinetuneOptions {
    pub(crate) classes: Vec<String>,
    pub(crate) image_size: usize,
    #[serde(default)]
    pub(crate) freeze_backbone: bool,
    #[serde(default = "augment_default")]
    pub(crate) augment: bool,
    pub(crate) data: PathBuf,
}

fn augment_default() -> bool {
    true
}

impl FinetuneOptions {
    pub(crate) fn to_map(&self) -> BTreeMap<String, Value> {
        run_info::to_map(self)
    }

    /// The options as one JSON object (stored in quantized files).
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads [`to_json`](Self::to_json)'s text back; `file` names its source in errors.
    pub(crate) fn from_json(text: &str, file: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| {
            RecipeError::Train(kiln_trainer::TrainError::Checkpoint {
                path: file.to_path_buf(),
                reason: format!("bad fine-tuning settings: {e}"),
            })
        })
    }

    /// Reads the options back from a checkpoint; `file` names it in errors.
    pub(crate) fn from_map(map: &BTreeMap<String, Value>, file: &Path) -> Result<Self> {
        run_info::from_map(map, file, "fine-tuning")
    }
}

/// `DIR/NAME` when it exists, with an error explaining the layout otherwise.
fn split_dir(data: &Path, name: &str) -> Result<PathBuf> {
    let dir = data.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(RecipeError::Options {
            flag: "--data",
            reason: format!(
                "{} has no {name}/ directory: expected DIR/train/CLASS/*.png and \
                 DIR/val/CLASS/*.png (one sub-directory per class, as torchvision's ImageFolder)",
                data.display()
            ),
        })
    }
}

/// A fine-tuning data set: training and validation splits and their classes.
pub(crate) struct FinetuneData {
    pub(crate) train: Box<dyn ImageDataset>,
    pub(crate) val: Box<dyn ImageDataset>,
    pub(crate) classes: Vec<String>,
    /// Side of the square images (CIFAR-10 is always 32).
    pub(crate) image_size: usize,
}

/// Opens `DIR/train` and `DIR/val` (image folders with the same classes), or, when `DIR` holds
/// CIFAR-10's binary batches, those (at their own 32x32).
pub(crate) fn open_data(
    data: &Path,
    image_size: usize,
    augment: Option<u64>,
) -> Result<FinetuneData> {
    if Cifar10::is_cifar_dir(data) {
        return Ok(FinetuneData {
            train: Box::new(Cifar10::open(data, CifarSplit::Train, augment)?),
            val: Box::new(Cifar10::open(data, CifarSplit::Test, None)?),
            classes: CIFAR10_CLASSES.iter().map(|c| c.to_string()).collect(),
            image_size: 32,
        });
    }
    let augment = augment.map_or(Augment::None, |seed| Augment::Standard { seed });
    let train = ImageFolder::open(&split_dir(data, "train")?, image_size, augment)?;
    let val = ImageFolder::open(&split_dir(data, "val")?, image_size, Augment::None)?;
    if train.classes() != val.classes() {
        return Err(RecipeError::Options {
            flag: "--data",
            reason: format!(
                "train/ has classes {:?} but val/ has {:?}",
                train.classes(),
                val.classes()
            ),
        });
    }
    Ok(FinetuneData {
        classes: train.classes().to_vec(),
        train: Box::new(train),
        val: Box::new(val),
        image_size,
    })
}

/// Fine-tunes the ResNet, evaluating and checkpointing after every epoch.
///
/// # Errors
/// Data errors naming the file or directory; [`RecipeError::Options`] for a class count that
/// does not match the data or an image size the network cannot take; weight errors naming the
/// missing, unused or mis-shaped tensors (the wrong model); checkpoint errors on `--resume`.
pub fn run(config: &FinetuneConfig) -> Result<FinetuneReport> {
    let started = std::time::Instant::now();
    check_flags(config)?;
    // Every device the run needs, checked before the data is decoded.
    config.device.cuda_ordinals(config.ranks.get())?;
    let (run_dir, resume) = config.target.open()?;
    let base = resume
        .as_ref()
        .map_or_else(default_trainer_config, |(_, c)| c.state.config.clone());
    let seed = config.overrides.seed.unwrap_or(base.seed);
    let (depth, options) = settings(config, resume.as_ref())?;
    let data = open_data(
        &options.data,
        options.image_size,
        options.augment.then_some(seed),
    )?;
    let trainer_config = config.overrides.apply(base, data.train.len())?;
    let trainer_config = with_backbone_lr(trainer_config, config.backbone_lr);
    let options = check_classes(config, resume.is_some(), options, &data)?;
    let device = config.device.device()?.autodiff();
    // Burn initialises the backbone from the device's generator: seeded, a run repeats.
    device.seed(seed);
    let start = initial_model(config, depth, &options, seed, &device, resume.is_none())?;
    let initial_accuracy = resume.is_none().then(|| {
        let batch = NonZeroUsize::new(trainer_config.eval_batch_size).unwrap_or(NonZeroUsize::MIN);
        let inner = device.clone().inner();
        evaluate(
            &start.model.valid(),
            ResNet::forward,
            data.val.as_ref(),
            batch,
            &inner,
        )
        .accuracy
    });
    let labels = RunLabels {
        recipe: RECIPE.into(),
        model: ModelName::ResNet(depth).as_str().into(),
        quantization: None,
        options: options.to_map(),
    };
    let trainer = Trainer::new(trainer_config, &run_dir, labels)?
        .with_verbosity(config.verbosity)
        .with_stop(kiln_trainer::StopSignal::process());
    // Written once the settings are valid, so a refused run leaves no directory behind.
    if let Some(resolved) = &config.run_config {
        write_run_config(resolved, trainer.config(), &run_dir, resume.is_some())?;
    }
    let execution =
        Execution::on_ranks(config.device, config.ranks, config.collective_timeout, None)?;
    let splits = TrainData {
        train: data.train.as_ref(),
        test: data.val.as_ref(),
    };
    let StartModel {
        model,
        partial,
        trainable,
    } = start;
    let (model, fit) = trainer.fit(model, ResNet::forward, splits, resume, &execution)?;
    let weights_out = run_dir.join(WEIGHTS_FILE);
    let bytes = float_safetensors(&model.valid(), depth.name())?;
    std::fs::write(&weights_out, bytes).map_err(|e| kiln_models::ImportError::Write {
        path: weights_out.clone(),
        reason: e.to_string(),
    })?;
    crate::plot::write_run_curves(&run_dir, config.verbosity == Verbosity::Quiet);
    let finished = Finished {
        depth,
        run_dir,
        weights: weights_out,
        options,
        partial,
        trainable,
        initial_accuracy,
        fit,
        started,
    };
    Ok(finished.report(config))
}

/// Flags that are wrong on their own.
fn check_flags(config: &FinetuneConfig) -> Result<()> {
    if config.image_size < 32 {
        return Err(RecipeError::Options {
            flag: "--image-size",
            reason: format!(
                "{} is too small: ResNets take at least 32x32",
                config.image_size
            ),
        });
    }
    if let Some(lr) = config.backbone_lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(RecipeError::Options {
            flag: "--backbone-lr",
            reason: format!("must be a positive number, got {lr}"),
        });
    }
    Ok(())
}

/// `trainer_config` with the backbone at `backbone_lr`: the trainer's base rate goes to the
/// backbone and the head gets a group of its own (on resume, the head keeps the checkpoint's
/// rate, and a changed rate is refused).
/// The trainer settings a fine-tuning run resolves, without reading its data: its defaults
/// or its checkpoint's, with the flags over them (`--print-config`; a cosine schedule's length
/// depends on the data and is not a flag).
///
/// # Errors
/// Checkpoint errors for `--resume`, [`RecipeError::Options`] for flags that do not combine.
pub fn resolved_trainer_config(config: &FinetuneConfig) -> Result<TrainerConfig> {
    let base = config
        .target
        .base_config()?
        .unwrap_or_else(default_trainer_config);
    let trainer_config = config.overrides.apply(base, 1)?;
    Ok(with_backbone_lr(trainer_config, config.backbone_lr))
}

fn with_backbone_lr(mut trainer_config: TrainerConfig, backbone_lr: Option<f64>) -> TrainerConfig {
    if let Some(backbone_lr) = backbone_lr {
        let head_lr = trainer_config
            .lr_groups
            .first()
            .map_or(trainer_config.lr, |g| g.lr);
        trainer_config.lr = backbone_lr;
        trainer_config.lr_groups = vec![LrGroup {
            prefix: HEAD_PREFIX.into(),
            lr: head_lr,
        }];
    }
    trainer_config
}

/// The architecture and settings of the run: a resumed run keeps its own.
fn settings(
    config: &FinetuneConfig,
    resume: Option<&(PathBuf, Checkpoint)>,
) -> Result<(ResNetDepth, FinetuneOptions)> {
    let Some((file, checkpoint)) = resume else {
        let options = FinetuneOptions {
            classes: Vec::new(),
            image_size: config.image_size,
            freeze_backbone: config.freeze_backbone,
            augment: config.augment,
            data: config.data.clone(),
        };
        return Ok((config.depth, options));
    };
    let ModelName::ResNet(depth) = ModelName::parse(&checkpoint.state.model, file)? else {
        return Err(RecipeError::Options {
            flag: "--resume",
            reason: format!(
                "{} holds a {} run, not a fine-tuned ResNet: resume it with kiln train",
                file.display(),
                checkpoint.state.model
            ),
        });
    };
    let options = FinetuneOptions::from_map(&checkpoint.state.options, file)?;
    Ok((depth, options))
}

/// The settings with the data's classes and image size, checked against `--num-classes` and,
/// when resuming, against the classes the run was trained on.
fn check_classes(
    config: &FinetuneConfig,
    resuming: bool,
    options: FinetuneOptions,
    data: &FinetuneData,
) -> Result<FinetuneOptions> {
    let classes = &data.classes;
    if let Some(n) = config.num_classes
        && n != classes.len()
    {
        return Err(RecipeError::Options {
            flag: "--num-classes",
            reason: format!(
                "the data has {} classes ({}), not {n}",
                classes.len(),
                classes.join(", ")
            ),
        });
    }
    if resuming && *classes != options.classes {
        return Err(RecipeError::Options {
            flag: "--resume",
            reason: format!(
                "the run was trained on classes {:?}; {} now has {:?}",
                options.classes,
                options.data.display(),
                classes
            ),
        });
    }
    Ok(FinetuneOptions {
        classes: classes.clone(),
        image_size: data.image_size,
        ..options
    })
}

/// The model a run starts from, and what loading its weights left out.
struct StartModel {
    model: ResNet,
    /// Keys missing from and unused in partially loaded weights.
    partial: Option<(Vec<String>, Vec<String>)>,
    trainable: usize,
}

/// The ResNet with its new head, PyTorch weights loaded for a fresh run, backbone frozen
/// when asked.
fn initial_model(
    config: &FinetuneConfig,
    depth: ResNetDepth,
    options: &FinetuneOptions,
    seed: u64,
    device: &Device,
    fresh: bool,
) -> Result<StartModel> {
    let mut model = ResNet::new(depth, 1000, device).with_new_head(options.classes.len(), seed);
    let mut partial = None;
    if let (Some(weights), true) = (&config.weights, fresh) {
        let load = LoadOptions {
            new_head: true,
            allow_partial: config.allow_partial,
        };
        let report = load_weights_with(&mut model, weights, load)?;
        partial = Some((report.missing, report.unused));
    }
    if options.freeze_backbone {
        model = model.freeze_backbone();
    }
    let trainable = if options.freeze_backbone {
        model.fc.num_params()
    } else {
        model.num_params()
    };
    Ok(StartModel {
        model,
        partial,
        trainable,
    })
}

/// A finished fine-tuning run, for its report.
struct Finished {
    depth: ResNetDepth,
    run_dir: PathBuf,
    weights: PathBuf,
    options: FinetuneOptions,
    partial: Option<(Vec<String>, Vec<String>)>,
    trainable: usize,
    initial_accuracy: Option<f64>,
    fit: FitReport,
    started: std::time::Instant,
}

impl Finished {
    fn report(self, config: &FinetuneConfig) -> FinetuneReport {
        let fit = self.fit;
        let last = fit.history.last();
        let new_epochs = &fit.history[fit.resumed_from_epoch..];
        let (missing, unused) = self.partial.unwrap_or_default();
        FinetuneReport {
            recipe: RECIPE.into(),
            model: ModelName::ResNet(self.depth).as_str().into(),
            run_dir: self.run_dir,
            checkpoint: fit.last_checkpoint.clone(),
            weights: self.weights,
            classes: self.options.classes,
            image_size: self.options.image_size,
            freeze_backbone: self.options.freeze_backbone,
            trainable_parameters: self.trainable,
            missing_from_weights: missing,
            unused_in_weights: unused,
            initial_accuracy: self.initial_accuracy,
            epochs: fit.history.len(),
            test_accuracy: last.and_then(|m| m.test_accuracy).unwrap_or(0.0),
            test_loss: last.map_or(f64::NAN, |m| m.test_loss),
            train_loss: last.map_or(f64::NAN, |m| m.train_loss),
            samples_per_sec: fit.samples_per_sec(),
            seconds_per_epoch: if new_epochs.is_empty() {
                0.0
            } else {
                new_epochs.iter().map(|m| m.train_seconds).sum::<f64>() / new_epochs.len() as f64
            },
            ranks: config.ranks.get(),
            resumed_from_epoch: fit.resumed_from_epoch,
            history: fit.history,
            wall_seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}
