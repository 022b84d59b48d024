use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Bytes, Device, Tensor};
use kiln_multi::pipeline::{Activation, Pipeline, PipelineConfig, PipelineStage, merge_grads};
use kiln_multi::{
    BucketConfig, Collective, CollectiveConfig, DistributedDataParallel, DistributedSampler,
    DistributedSamplerConfig, FlatOptimizer, Rank, ReduceOp, ShardMemory, Transport, WorldSize,
    ZERO_STATE_MAGIC, ZeroConfig, ZeroOptimizer, ZeroStage, run_group,
};

use super::epoch::{EpochInputs, Updater, train_epoch};
use super::eval::{EvalSums, evaluate_indices};
use super::execution::Execution;
use crate::checkpoint::{
    Checkpoint, EpochMetrics, TrainerState, checkpoint_path, write_checkpoint_atomic,
};
use crate::config::TrainerConfig;
use crate::data::{ImageBatch, ImageDataset};
use crate::error::{Result, TrainError};
use crate::report::{Progress, Verbosity, write_metrics_jsonl};

/// Names recorded in checkpoints so that `eval` and `--resume` rebuild the right thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLabels {
    /// Recipe name, e.g. `cnn-mnist`.
    pub recipe: String,
    /// Model architecture, e.g. `simple-cnn`.
    pub model: String,
    /// Quantization the model trains under (quantization-aware training), in the recipe's
    /// spelling (`int8:tensor`); `None` for float training. A run resumes only with the same.
    pub quantization: Option<String>,
    /// Recipe settings that rebuild the model and its data (a fine-tuned ResNet's classes and
    /// image size); compared on resume.
    pub options: BTreeMap<String, serde_json::Value>,
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
    /// With a sharded optimizer (ZeRO): its stage and what rank 0 kept.
    pub sharding: Option<(ZeroStage, ShardMemory)>,
    /// With tensor parallelism: the parameter elements of rank 0's part of the model (each
    /// with a gradient and an optimizer state of its size).
    pub rank_parameter_elements: Option<usize>,
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

    /// Trains `model` up to `config.epochs` epochs as `execution` says, and returns it (rank
    /// 0's replica when data parallel in this process; this rank's, identical to it, across
    /// processes).
    ///
    /// With `resume`, the model parameters, optimizer state, step count and metric history
    /// are restored from the checkpoint and training continues at the next epoch: the result
    /// is the same as an uninterrupted run, since shuffles depend only on (seed, epoch).
    ///
    /// Data parallel over N ranks, each step trains on `batch_size / N` samples per rank and
    /// averages the gradients, which is the step of one device on `batch_size` samples;
    /// evaluation is split over the ranks too. Rank 0 alone prints and writes checkpoints.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] when `resume` does not belong to this recipe, model or
    /// configuration or its records do not load; [`TrainError::Io`] when a checkpoint or the
    /// metrics log cannot be written; [`TrainError::Config`] when the batch does not split
    /// evenly over the ranks; [`TrainError::Multi`] for an empty training set or a failed rank.
    pub fn fit<M, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        execution: &Execution,
    ) -> Result<(M, FitReport)>
    where
        M: Module,
        F: Fn(&M, Tensor<4>) -> Tensor<2> + Sync,
    {
        let world = execution.world_size()?;
        if !self.config.batch_size.is_multiple_of(world.get()) {
            return Err(TrainError::Config {
                field: "--batch-size",
                reason: format!(
                    "{} does not split evenly over {} ranks (the batch size is the global batch)",
                    self.config.batch_size,
                    world.get()
                ),
            });
        }
        match execution {
            Execution::Single(device) => self.fit_rank(
                model,
                &forward,
                data,
                resume,
                RankSetup::single(device),
                RankMode::Plain,
            ),
            Execution::DataParallel(dp) => {
                let replicas = Replicas::fork(&model, &dp.devices);
                let ranks = run_group(world, dp.collective, &dp.transport, |collective| {
                    let rank = collective.rank().index();
                    let replica = replicas.take(rank);
                    let setup = RankSetup {
                        device: &dp.devices[rank],
                        collective: Some(collective),
                        buckets: dp.buckets,
                        zero: dp.zero,
                    };
                    self.fit_rank(
                        replica,
                        &forward,
                        data,
                        resume.clone(),
                        setup,
                        RankMode::Plain,
                    )
                })?;
                Ok(ranks
                    .into_iter()
                    .next()
                    .expect("a world has at least rank 0"))
            }
            Execution::Process(group) => {
                let setup = RankSetup {
                    device: &group.device,
                    collective: Some(Arc::clone(&group.collective)),
                    buckets: group.buckets,
                    zero: group.zero,
                };
                self.fit_rank(
                    model.fork(&group.device),
                    &forward,
                    data,
                    resume,
                    setup,
                    RankMode::Plain,
                )
            }
        }
    }

    /// Trains `model` with tensor parallelism (Megatron-style): each of `split.devices.len()`
    /// ranks (threads) holds `split.split`'s part of the model, whose forward exchanges
    /// activations with the other ranks; every rank sees the same batches, the replicated
    /// layers' gradients are summed by `split.sync_gradients`, and each rank's optimizer steps
    /// its own part. Rank 0 reports; checkpoints hold the whole model (`split.gather`), so
    /// `eval`, `predict` and `quantize` read them like any other. Returns the whole model.
    ///
    /// # Errors
    /// As [`fit`](Self::fit); [`TrainError::Checkpoint`] for `resume` (a tensor-parallel
    /// run's optimizer state is split over the ranks and not saved, so no run resumes as one);
    /// [`TrainError::Multi`] when a rank fails or times out.
    pub fn fit_tensor_parallel<M, P, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: TensorParallelSplit<'_, M, P>,
    ) -> Result<(M, FitReport)>
    where
        M: Module,
        P: Module,
        F: Fn(&P, Tensor<4>) -> Tensor<2> + Sync,
    {
        if let Some((path, _)) = resume {
            return Err(TrainError::checkpoint(
                &path,
                "a run cannot continue with tensor parallelism: the ranks' optimizer states \
                 are not saved; start a new run, or resume without --tensor-parallel",
            ));
        }
        let world = WorldSize::new(split.devices.len())?;
        let replicas = Replicas::fork(&model, &split.devices);
        let ranks = run_group(world, split.collective, &split.transport, |collective| {
            let rank = collective.rank().index();
            let device = &split.devices[rank];
            let replica = replicas.take(rank);
            let part = (split.split)(&replica, Arc::clone(&collective))?;
            let whole_record = |part: &P| -> Result<_> {
                Ok((split.gather)(part, &*collective)?
                    .into_record()
                    .into_bytes())
            };
            let tp = TensorParallelRank {
                collective: Arc::clone(&collective),
                sync_gradients: split.sync_gradients,
                whole_record: &whole_record,
            };
            let setup = RankSetup::single(device);
            let (part, report) = self.fit_rank(
                part,
                &forward,
                data,
                None,
                setup,
                RankMode::TensorParallel(&tp),
            )?;
            Ok::<_, TrainError>(((split.gather)(&part, &*collective)?, report))
        })?;
        Ok(ranks
            .into_iter()
            .next()
            .expect("a world has at least rank 0"))
    }

    /// Trains `model` as [`fit`](Self::fit) does on one device, but every step runs through
    /// a pipeline of stages made by `split.split` from the current model: micro-batches flow
    /// through the stages on their threads (and devices) under `split.config.schedule`, and the
    /// stages' gradients go to the model's one optimizer. A step is the same update as on one
    /// device; checkpoints, resume and evaluation are those of the whole model. Each epoch
    /// records the measured bubble fraction.
    ///
    /// # Errors
    /// As [`fit`](Self::fit), and [`TrainError::Multi`] when a stage is misplaced, fails or
    /// times out.
    pub fn fit_pipeline<M, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: PipelineSplit<'_, M>,
    ) -> Result<(M, FitReport)>
    where
        M: Module,
        F: Fn(&M, Tensor<4>) -> Tensor<2>,
    {
        let run = PipelineRun {
            pipeline: Pipeline::new(split.stages, split.config)?,
            split: split.split,
        };
        let setup = RankSetup::single(&split.device);
        self.fit_rank(
            model,
            &forward,
            data,
            resume,
            setup,
            RankMode::Pipeline(&run),
        )
    }

    /// The training run of one rank (the only one, on a single device).
    fn fit_rank<M, F>(
        &self,
        model: M,
        forward: &F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        setup: RankSetup<'_>,
        mode: RankMode<'_, M>,
    ) -> Result<(M, FitReport)>
    where
        M: Module,
        F: Fn(&M, Tensor<4>) -> Tensor<2>,
    {
        let (pipeline, tensor_parallel) = match mode {
            RankMode::Plain => (None, None),
            RankMode::Pipeline(run) => (Some(run), None),
            RankMode::TensorParallel(tp) => (None, Some(tp)),
        };
        let config = &self.config;
        let device = setup.device;
        let mut optimizer = config.optimizer();
        let (mut model, mut history, mut step) = (model, Vec::new(), 0u64);
        let mut last_checkpoint = None;
        // The optimizer state of a resumed sharded run, loaded once the shards are planned.
        let mut sharded_state = None;
        if let Some((path, checkpoint)) = resume {
            self.check_resumable(&path, &checkpoint.state)?;
            model = checkpoint.load_model(model, &path)?;
            if checkpoint
                .optimizer
                .starts_with(TENSOR_PARALLEL_STATE_MAGIC)
            {
                return Err(TrainError::checkpoint(
                    &path,
                    "it was trained with tensor parallelism, whose optimizer state stays split \
                     over the ranks and is not saved, so it cannot continue exactly; its model \
                     evaluates, predicts and quantizes like any other",
                ));
            }
            let sharded = checkpoint.optimizer.starts_with(ZERO_STATE_MAGIC);
            match (sharded, setup.zero) {
                (true, Some(_)) => sharded_state = Some((path.clone(), checkpoint.optimizer)),
                (false, None) => {
                    let bad =
                        |e: burn::store::RecordError| TrainError::checkpoint(&path, e.to_string());
                    optimizer = optimizer
                        .from_bytes(Bytes::from_bytes_vec(checkpoint.optimizer))
                        .map_err(bad)?;
                }
                (true, None) => {
                    return Err(TrainError::checkpoint(
                        &path,
                        "its optimizer state is sharded (trained with --zero): resume it with \
                         --zero 1 or 2 and data parallelism",
                    ));
                }
                (false, Some(_)) => {
                    return Err(TrainError::checkpoint(
                        &path,
                        "it was trained without --zero: resume it without --zero",
                    ));
                }
            }
            history = checkpoint.state.history;
            step = checkpoint.state.step;
            last_checkpoint = Some(path);
        }
        let resumed_from_epoch = history.len();
        if setup.zero.is_some() && !config.lr_groups.is_empty() {
            return Err(TrainError::Config {
                field: "--zero",
                reason: "a sharded optimizer runs one learning rate; drop the per-group rates \
                         (e.g. --backbone-lr) or --zero"
                    .into(),
            });
        }
        // After the checkpoint is loaded, so that the buckets see the final parameters.
        let (mut ddp, mut zero) = (None, None);
        match (setup.collective, setup.zero) {
            (Some(collective), None) => {
                let (synced, d) = DistributedDataParallel::new(model, collective, setup.buckets)?;
                model = synced;
                ddp = Some(d);
            }
            (Some(collective), Some(stage)) => {
                let zero_config = ZeroConfig {
                    stage,
                    optimizer: FlatOptimizer::SgdMomentum {
                        momentum: config.momentum,
                        dampening: 0.0,
                    },
                };
                let (synced, mut z) = ZeroOptimizer::new(model, collective, zero_config)?;
                if let Some((path, bytes)) = &sharded_state {
                    z.load_state_bytes(bytes)
                        .map_err(|e| TrainError::checkpoint(path, e.to_string()))?;
                }
                model = synced;
                zero = Some(z);
            }
            (None, _) => {}
        }
        let collective = match (&ddp, &zero) {
            (Some(d), _) => Some(Arc::clone(d.collective())),
            (_, Some(z)) => Some(Arc::clone(z.collective())),
            _ => None,
        };
        let (rank, world) = collective
            .as_ref()
            .map_or((Rank::ZERO, WorldSize::ONE), |c| (c.rank(), c.world_size()));
        // In a tensor-parallel group every rank trains on the same data (the sampler's world
        // is the data-parallel one); its rank 0 reports and writes checkpoints.
        let is_root = rank == Rank::ZERO
            && tensor_parallel.is_none_or(|tp| tp.collective.rank() == Rank::ZERO);

        let sampler = DistributedSampler::new(
            data.train.len(),
            world,
            DistributedSamplerConfig {
                shuffle: true,
                seed: config.seed,
                drop_last: false,
            },
        )?;
        let local_batch = config.batch_size / world.get();
        let eval_shard: Vec<usize> = (rank.index()..data.test.len())
            .step_by(world.get())
            .collect();
        let loss_fn = CrossEntropyLossConfig::new().init(device);
        let eval_batch_size = NonZeroUsize::new(config.eval_batch_size).expect(
            "TrainerConfig::validate, called in Trainer::new, rejects a zero eval_batch_size",
        );
        let mut progress = Progress::new(if is_root {
            self.verbosity
        } else {
            Verbosity::Quiet
        });
        if resumed_from_epoch > 0 {
            progress.log(&format!(
                "resuming {} after epoch {resumed_from_epoch} (step {step})",
                self.run_dir.display()
            ));
        }
        if world.get() > 1 {
            progress.log(&format!(
                "data parallel on {} ranks: {} samples per rank per step, global batch {}",
                world.get(),
                local_batch,
                config.batch_size
            ));
        }
        for epoch in resumed_from_epoch..config.epochs {
            let order = sampler.indices(rank, epoch as u64);
            progress.start_epoch(epoch + 1, config.epochs, order.len().div_ceil(local_batch));
            let inputs = EpochInputs {
                data: data.train,
                order: &order,
                batch_size: local_batch,
                lr: config.lr,
                lr_groups: &config.lr_groups,
                device,
                epoch,
            };
            // Pipeline runs: sum and count of the steps' measured bubble fractions.
            let mut bubbles = (0.0f64, 0usize);
            let mut loss_and_grads = |model: &M, batch: ImageBatch| match pipeline {
                None => {
                    let logits = forward(model, batch.images);
                    let loss = loss_fn.forward(logits, batch.targets);
                    let value = loss.clone().into_scalar::<f64>();
                    let mut grads = GradientsParams::from_grads(loss.backward(), model);
                    if let Some(tp) = tensor_parallel {
                        (tp.sync_gradients)(model, &mut grads, &*tp.collective)?;
                    }
                    Ok((value, grads))
                }
                Some(run) => {
                    let mut stages = (run.split)(model);
                    let report = run.pipeline.run(
                        &mut stages,
                        Activation::Rank4(batch.images),
                        batch.targets,
                    )?;
                    bubbles.0 += report.bubble_fraction();
                    bubbles.1 += 1;
                    Ok((report.loss, merge_grads(model, &mut stages)))
                }
            };
            let updater = match zero.as_mut() {
                Some(zero) => Updater::Sharded(zero),
                None => Updater::Replicated {
                    optimizer: &mut optimizer,
                    ddp: ddp.as_mut(),
                },
            };
            let (trained, outcome) =
                train_epoch(model, &mut loss_and_grads, updater, inputs, &progress)?;
            let bubble_fraction = (bubbles.1 > 0).then(|| bubbles.0 / bubbles.1 as f64);
            model = trained;
            step += outcome.steps;
            progress.evaluating();
            let eval_start = Instant::now();
            let mut sums = evaluate_indices(
                &model,
                forward,
                data.test,
                &eval_shard,
                eval_batch_size,
                device,
            );
            let mut train_loss = outcome.mean_loss;
            if let Some(collective) = &collective {
                // Every rank has the same number of equal-sized batches, so the mean of the
                // ranks' mean losses is the mean over all samples.
                let mut totals = [
                    sums.loss_sum as f32,
                    sums.correct as f32,
                    sums.samples as f32,
                    train_loss as f32,
                ];
                collective.all_reduce(&mut totals, ReduceOp::Sum)?;
                sums = EvalSums {
                    loss_sum: f64::from(totals[0]),
                    correct: f64::from(totals[1]),
                    samples: f64::from(totals[2]),
                };
                train_loss = f64::from(totals[3]) / world.get() as f64;
            }
            let eval = sums.metrics(eval_start.elapsed().as_secs_f64());
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                step,
                train_loss,
                test_loss: eval.loss,
                test_accuracy: eval.accuracy,
                samples_per_sec: (outcome.samples * world.get()) as f64 / outcome.seconds.max(1e-9),
                train_seconds: outcome.seconds,
                bubble_fraction,
            };
            progress.end_epoch(config.epochs, &metrics);
            history.push(metrics);
            // Every rank takes part in gathering a sharded state; rank 0 writes it.
            let sharded_bytes = zero.as_ref().map(ZeroOptimizer::state_bytes).transpose()?;
            // Likewise the whole model of a tensor-parallel group.
            let whole_model = tensor_parallel
                .map(|tp| (tp.whole_record)(&model))
                .transpose()?;
            if is_root {
                let path = checkpoint_path(&self.run_dir, epoch + 1);
                let optimizer_bytes = match (sharded_bytes, tensor_parallel) {
                    (Some(bytes), _) => bytes,
                    // Each rank's optimizer holds state for its own shards only.
                    (None, Some(_)) => TENSOR_PARALLEL_STATE_MAGIC.to_vec(),
                    (None, None) => record_bytes(&path, optimizer.into_bytes())?,
                };
                let model_bytes = match whole_model {
                    Some(bytes) => record_bytes(&path, bytes)?,
                    None => record_bytes(&path, model.clone().into_record().into_bytes())?,
                };
                let checkpoint = Checkpoint {
                    state: TrainerState {
                        recipe: self.labels.recipe.clone(),
                        model: self.labels.model.clone(),
                        quantization: self.labels.quantization.clone(),
                        options: self.labels.options.clone(),
                        epoch: epoch + 1,
                        step,
                        config: config.clone(),
                        history: history.clone(),
                    },
                    model: model_bytes,
                    optimizer: optimizer_bytes,
                };
                write_checkpoint_atomic(&path, &checkpoint)?;
                write_metrics_jsonl(&self.run_dir, &history)?;
                last_checkpoint = Some(path);
            }
        }
        let report = FitReport {
            history,
            resumed_from_epoch,
            last_checkpoint,
            sharding: zero.as_ref().map(|z| (z.config().stage, z.memory())),
            rank_parameter_elements: tensor_parallel.map(|_| model.num_params()),
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
        if state.quantization != self.labels.quantization {
            let name = |q: &Option<String>| {
                q.as_ref().map_or("float training".to_string(), |q| {
                    format!("quantization-aware training ({q})")
                })
            };
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "it comes from {}, not {}",
                    name(&state.quantization),
                    name(&self.labels.quantization)
                ),
            ));
        }
        if state.options != self.labels.options {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "it was trained with {}; resuming needs the same, got {}",
                    serde_json::to_string(&state.options).unwrap_or_default(),
                    serde_json::to_string(&self.labels.options).unwrap_or_default()
                ),
            ));
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

/// How [`Trainer::fit_pipeline`] splits a model into pipeline stages.
pub struct PipelineSplit<'a, M> {
    /// The device of the whole model: evaluation and the optimizer run there.
    pub device: Device,
    /// Schedule, micro-batches, timeout and threads per stage.
    pub config: PipelineConfig,
    /// How many stages `split` makes.
    pub stages: NonZeroUsize,
    /// Builds the stages from the current model, sharing its parameters (module clones).
    pub split: &'a (dyn Fn(&M) -> Vec<Box<dyn PipelineStage>> + Sync),
}

/// What a tensor-parallel checkpoint holds instead of an optimizer state.
const TENSOR_PARALLEL_STATE_MAGIC: &[u8] = b"KILN-TP-NO-OPTIMIZER-STATE";

/// Builds a rank's part `P` of a model `M` from the model and the rank's handle on its group.
pub type SplitModel<'a, M, P> =
    dyn Fn(&M, Arc<dyn Collective>) -> kiln_multi::Result<P> + Sync + 'a;
/// Rebuilds the whole model `M` from the ranks' parts `P`; every rank calls it together.
pub type GatherModel<'a, M, P> = dyn Fn(&P, &dyn Collective) -> kiln_multi::Result<M> + Sync + 'a;
/// Completes a rank's gradients of its part `P` with the other ranks' contributions.
pub type SyncGradients<'a, P> =
    dyn Fn(&P, &mut GradientsParams, &dyn Collective) -> kiln_multi::Result<()> + Sync + 'a;

/// How [`Trainer::fit_tensor_parallel`] splits a model `M` over the ranks of a
/// tensor-parallel group, each rank training its part `P`.
pub struct TensorParallelSplit<'a, M, P> {
    /// One autodiff device per rank (on the CPU, the Flex device repeated).
    pub devices: Vec<Device>,
    /// Timeout of every collective.
    pub collective: CollectiveConfig,
    /// How the ranks exchange data.
    pub transport: Transport,
    /// This rank's part of the model: its shard of the split layers, the other layers
    /// replicated, holding its handle on the group for the collectives of its forward.
    pub split: &'a SplitModel<'a, M, P>,
    /// The whole model again from the ranks' parts; every rank calls it together.
    pub gather: &'a GatherModel<'a, M, P>,
    /// Adds up over the ranks the partial gradients of the replicated layers that feed split
    /// ones (e.g. [`kiln_multi::tensor_parallel::sum_gradients`] on the layers in front).
    pub sync_gradients: &'a SyncGradients<'a, P>,
}

/// A rank of a tensor-parallel group, as [`Trainer::fit_rank`] sees it.
struct TensorParallelRank<'a, P> {
    collective: Arc<dyn Collective>,
    sync_gradients: &'a SyncGradients<'a, P>,
    /// The whole model's record, gathered from the ranks' parts (every rank calls it).
    whole_record: &'a WholeRecord<'a, P>,
}

/// The record bytes of the whole model, gathered from a tensor-parallel rank's part.
type WholeRecord<'a, P> =
    dyn Fn(&P) -> Result<std::result::Result<Bytes, burn::store::RecordError>> + 'a;

/// How one rank's steps run, besides plain data parallelism.
enum RankMode<'a, M> {
    /// The whole model on the rank's device.
    Plain,
    /// Through a pipeline of stages.
    Pipeline(&'a PipelineRun<'a, M>),
    /// As one rank of a tensor-parallel group.
    TensorParallel(&'a TensorParallelRank<'a, M>),
}

/// One copy of a model per rank, forked to the rank's device (so each rank has its own
/// autodiff graph), for the rank threads to take.
struct Replicas<M>(Vec<Mutex<Option<M>>>);

impl<M: Module> Replicas<M> {
    fn fork(model: &M, devices: &[Device]) -> Self {
        Self(
            devices
                .iter()
                .map(|device| Mutex::new(Some(model.clone().fork(device))))
                .collect(),
        )
    }

    /// Rank `rank`'s copy; each is taken once.
    fn take(&self, rank: usize) -> M {
        self.0[rank]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("each rank takes its own replica once")
    }
}

/// A pipeline runner and the split it runs.
struct PipelineRun<'a, M> {
    pipeline: Pipeline,
    split: &'a (dyn Fn(&M) -> Vec<Box<dyn PipelineStage>> + Sync),
}

/// What one rank trains with.
struct RankSetup<'a> {
    device: &'a Device,
    /// The group of a data-parallel run; `None` on a single device.
    collective: Option<Arc<dyn Collective>>,
    buckets: BucketConfig,
    /// Shard the optimizer state (and gradients) over the group instead of replicating it.
    zero: Option<ZeroStage>,
}

impl<'a> RankSetup<'a> {
    fn single(device: &'a Device) -> Self {
        Self {
            device,
            collective: None,
            buckets: BucketConfig::default(),
            zero: None,
        }
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
