use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Bytes, Device, Tensor};
use kiln_multi::{DistributedSampler, DistributedSamplerConfig, Rank, WorldSize};

use super::epoch::{EpochInputs, train_epoch};
use super::eval::evaluate;
use crate::checkpoint::{
    Checkpoint, EpochMetrics, TrainerState, checkpoint_path, write_checkpoint_atomic,
};
use crate::config::TrainerConfig;
use crate::data::ImageDataset;
use crate::error::{Result, TrainError};
use crate::report::{Progress, Verbosity, write_metrics_jsonl};

/// Names recorded in checkpoints so that `eval` and `--resume` rebuild the right thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLabels {
    /// Recipe name, e.g. `cnn-mnist`.
    pub recipe: String,
    /// Model architecture, e.g. `simple-cnn`.
    pub model: String,
}

/// The data of a run.
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    /// Training samples, reshuffled every epoch.
    pub train: &'a dyn ImageDataset,
    /// Test samples, evaluated in order after every epoch.
    pub test: &'a dyn ImageDataset,
}

/// What [`Trainer::fit`] did.
#[derive(Debug, Clone)]
#[must_use]
pub struct FitReport {
    /// Metrics of every epoch of the run, those of a resumed-from checkpoint included.
    pub history: Vec<EpochMetrics>,
    /// Epochs that had already been completed when this call started (0 for a fresh run).
    pub resumed_from_epoch: usize,
    /// The checkpoint holding the final state.
    pub last_checkpoint: Option<PathBuf>,
}

impl FitReport {
    /// Training samples per second over all epochs, evaluation excluded.
    pub fn samples_per_sec(&self) -> f64 {
        EpochMetrics::throughput(&self.history)
    }
}

/// Trains a classifier with SGD and momentum, evaluating and checkpointing after every epoch.
pub struct Trainer {
    config: TrainerConfig,
    run_dir: PathBuf,
    labels: RunLabels,
    verbosity: Verbosity,
}

impl Trainer {
    /// A trainer writing checkpoints and `metrics.jsonl` under `run_dir`.
    ///
    /// # Errors
    /// [`TrainError::Config`] when `config` is invalid.
    pub fn new(config: TrainerConfig, run_dir: &Path, labels: RunLabels) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            run_dir: run_dir.to_path_buf(),
            labels,
            verbosity: Verbosity::Bar,
        })
    }

    /// Sets how much is printed on stderr (default: progress bar and a line per epoch).
    pub fn with_verbosity(mut self, verbosity: Verbosity) -> Self {
        self.verbosity = verbosity;
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Trains `model` on an autodiff `device` up to `config.epochs` epochs and returns it.
    ///
    /// With `resume`, the model parameters, optimizer state, step count and metric history
    /// are restored from the checkpoint and training continues at the next epoch: the result
    /// is the same as an uninterrupted run, since shuffles depend only on (seed, epoch).
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] when `resume` does not belong to this recipe, model or
    /// configuration or its records do not load; [`TrainError::Io`] when a checkpoint or the
    /// metrics log cannot be written; [`TrainError::Multi`] for an empty training set.
    pub fn fit<M, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        device: &Device,
    ) -> Result<(M, FitReport)>
    where
        M: Module,
        F: Fn(&M, Tensor<4>) -> Tensor<2>,
    {
        let config = &self.config;
        let mut optimizer = SgdConfig::new()
            .with_momentum(Some(MomentumConfig {
                momentum: config.momentum,
                dampening: 0.0,
                nesterov: false,
            }))
            .init();
        let (mut model, mut history, mut step) = (model, Vec::new(), 0u64);
        let mut last_checkpoint = None;
        if let Some((path, checkpoint)) = resume {
            self.check_resumable(&path, &checkpoint.state)?;
            model = checkpoint.load_model(model, &path)?;
            let bad = |e: burn::store::RecordError| TrainError::checkpoint(&path, e.to_string());
            optimizer = optimizer
                .from_bytes(Bytes::from_bytes_vec(checkpoint.optimizer))
                .map_err(bad)?;
            history = checkpoint.state.history;
            step = checkpoint.state.step;
            last_checkpoint = Some(path);
        }
        let resumed_from_epoch = history.len();

        let sampler = DistributedSampler::new(
            data.train.len(),
            WorldSize::ONE,
            DistributedSamplerConfig {
                shuffle: true,
                seed: config.seed,
                drop_last: false,
            },
        )?;
        let loss_fn = CrossEntropyLossConfig::new().init(device);
        let eval_batch_size = NonZeroUsize::new(config.eval_batch_size).expect(
            "TrainerConfig::validate, called in Trainer::new, rejects a zero eval_batch_size",
        );
        let mut progress = Progress::new(self.verbosity);
        if resumed_from_epoch > 0 {
            progress.log(&format!(
                "resuming {} after epoch {resumed_from_epoch} (step {step})",
                self.run_dir.display()
            ));
        }
        for epoch in resumed_from_epoch..config.epochs {
            let order = sampler.indices(Rank::ZERO, epoch as u64);
            progress.start_epoch(
                epoch + 1,
                config.epochs,
                order.len().div_ceil(config.batch_size),
            );
            let inputs = EpochInputs {
                data: data.train,
                order: &order,
                batch_size: config.batch_size,
                lr: config.lr,
                loss_fn: &loss_fn,
                device,
            };
            let (trained, outcome) =
                train_epoch(model, &forward, &mut optimizer, inputs, &progress);
            model = trained;
            step += outcome.steps;
            progress.evaluating();
            let eval = evaluate(&model, &forward, data.test, eval_batch_size, device);
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                step,
                train_loss: outcome.mean_loss,
                test_loss: eval.loss,
                test_accuracy: eval.accuracy,
                samples_per_sec: outcome.samples as f64 / outcome.seconds.max(1e-9),
                train_seconds: outcome.seconds,
            };
            progress.end_epoch(config.epochs, &metrics);
            history.push(metrics);
            let path = checkpoint_path(&self.run_dir, epoch + 1);
            let checkpoint = Checkpoint {
                state: TrainerState {
                    recipe: self.labels.recipe.clone(),
                    model: self.labels.model.clone(),
                    epoch: epoch + 1,
                    step,
                    config: config.clone(),
                    history: history.clone(),
                },
                model: record_bytes(&path, model.clone().into_record().into_bytes())?,
                optimizer: record_bytes(&path, optimizer.into_bytes())?,
            };
            write_checkpoint_atomic(&path, &checkpoint)?;
            write_metrics_jsonl(&self.run_dir, &history)?;
            last_checkpoint = Some(path);
        }
        let report = FitReport {
            history,
            resumed_from_epoch,
            last_checkpoint,
        };
        Ok((model, report))
    }

    fn check_resumable(&self, path: &Path, state: &TrainerState) -> Result<()> {
        let mismatch = |what: &str, found: &str, expected: &str| {
            Err(TrainError::checkpoint(
                path,
                format!("it was written by {what} {found}, not {expected}"),
            ))
        };
        if state.recipe != self.labels.recipe {
            return mismatch("recipe", &state.recipe, &self.labels.recipe);
        }
        if state.model != self.labels.model {
            return mismatch("model", &state.model, &self.labels.model);
        }
        let comparable = TrainerConfig {
            epochs: self.config.epochs,
            ..state.config.clone()
        };
        if comparable != self.config {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "it was trained with {:?}; resuming needs the same settings (only epochs may change), got {:?}",
                    state.config, self.config
                ),
            ));
        }
        if state.history.len() != state.epoch {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "state is inconsistent: epoch {} with {} history entries",
                    state.epoch,
                    state.history.len()
                ),
            ));
        }
        Ok(())
    }
}

fn record_bytes(
    path: &Path,
    bytes: std::result::Result<Bytes, burn::store::RecordError>,
) -> Result<Vec<u8>> {
    bytes
        .map(|b| b.to_vec())
        .map_err(|e| TrainError::checkpoint(path, format!("cannot serialise record: {e}")))
}
