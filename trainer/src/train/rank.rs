//! The training run of one rank: restore, synchronisation, epochs, metric reduction and
//! checkpoints, each its own function.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Bytes, Device};
use kiln_multi::data_parallel::DeviceReduce;
use kiln_multi::{
    BucketConfig, Collective, DistributedDataParallel, DistributedSampler,
    DistributedSamplerConfig, Rank, WorldSize, ZERO_STATE_MAGIC, ZeroConfig, ZeroOptimizer,
    ZeroStage, all_reduce_sum_f64,
};

use super::base::{StepFn, Trainer, record_bytes, scalar_loss};
use super::data::Batches;
use super::epoch::{
    EpochProgress, EpochReport, GradSource, SplitNorm, StepPolicy, Stretch, StretchEnd, Updater,
    train_epoch,
};
use super::resume_point::{gather_progress, remove_superseded_mid_epoch, resumed_rank_progress};
use super::zero_state;
use crate::checkpoint::{
    BackgroundWriter, Checkpoint, EpochMetrics, MidEpoch, TrainerState, apply_retention,
    checkpoint_path, step_checkpoint_path, write_checkpoint_atomic,
};
use crate::config::TrainerConfig;
use crate::error::{Result, TrainError};
use crate::report::run_state::RunStateWriter;
use crate::report::tensorboard::EventWriter;
use crate::report::{Progress, Verbosity, write_metrics_jsonl};
use crate::step::MetricSums;

/// What one rank trains with.
pub(super) struct RankSetup<'a> {
    pub(super) device: &'a Device,
    /// The group of a data-parallel run; `None` on a single device.
    pub(super) collective: Option<Arc<dyn Collective>>,
    pub(super) buckets: BucketConfig,
    /// Shard the optimizer state (and gradients) over the group instead of replicating it.
    pub(super) zero: Option<ZeroStage>,
    /// Through a pipeline of this many stages (for the run's record).
    pub(super) pipeline_stages: Option<NonZeroUsize>,
    /// Off the CPU, how DDP averages the buckets it builds on the device (`None`: through
    /// the host collective).
    pub(super) device_reduce: Option<Arc<dyn DeviceReduce>>,
}

impl<'a> RankSetup<'a> {
    pub(super) fn single(device: &'a Device) -> Self {
        Self {
            device,
            collective: None,
            buckets: BucketConfig::default(),
            zero: None,
            pipeline_stages: None,
            device_reduce: None,
        }
    }
}

/// What a rank trains: where its gradients come from, how it evaluates, and its data.
pub(super) struct RankTask<'a, M, B> {
    pub(super) source: &'a GradSource<'a, M, B>,
    pub(super) eval: &'a StepFn<'a, M, B>,
    pub(super) data: &'a dyn Batches<B>,
}

impl<M, B> Clone for RankTask<'_, M, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M, B> Copy for RankTask<'_, M, B> {}

/// A rank of a tensor-parallel group, as [`Trainer::fit_rank`] sees it.
pub(super) struct TensorParallelRank<'a, P> {
    pub(super) collective: Arc<dyn Collective>,
    /// Every rank of the run (the tensor-parallel group, or the whole mesh when the group is
    /// one of several data-parallel replicas): they stop after the same step together.
    pub(super) agreement: Arc<dyn Collective>,
    /// The parameters of the part that hold this rank's share of split layers.
    pub(super) split_params: Vec<burn::module::ParamId>,
    /// The whole model's record and optimizer record, gathered from the ranks' parts and
    /// their optimizers' records (every rank calls it).
    pub(super) whole: &'a WholeState<'a, P>,
}

/// The whole model's record bytes and its optimizer record bytes (the files a single device
/// would write), from a tensor-parallel rank's part and its optimizer's record.
pub(super) type WholeState<'a, P> = dyn Fn(&P, Vec<u8>) -> Result<(Vec<u8>, Vec<u8>)> + 'a;

/// What older tensor-parallel checkpoints hold instead of an optimizer state.
const TENSOR_PARALLEL_STATE_MAGIC: &[u8] = b"KILN-TP-NO-OPTIMIZER-STATE";

/// Refuses a checkpoint of an older kiln's tensor-parallel run, which saved no optimizer state.
fn check_optimizer_saved(path: &Path, optimizer: &[u8]) -> Result<()> {
    if optimizer.starts_with(TENSOR_PARALLEL_STATE_MAGIC) {
        return Err(TrainError::checkpoint(
            path,
            "it was written by an older kiln's tensor-parallel run, which did not save the \
             optimizer state, so it cannot continue exactly; its model evaluates, predicts \
             and quantizes like any other",
        ));
    }
    Ok(())
}

/// Refuses a checkpoint whose optimizer state a tensor-parallel run cannot split: a sharded
/// (ZeRO) one, or an older tensor-parallel run's, which saved none.
pub(super) fn check_splittable_state(path: &Path, optimizer: &[u8]) -> Result<()> {
    check_optimizer_saved(path, optimizer)?;
    if optimizer.starts_with(ZERO_STATE_MAGIC) {
        return Err(TrainError::checkpoint(
            path,
            "its optimizer state is sharded (trained with --zero): resume it with --zero 1 or \
             2 and data parallelism, without tensor parallelism",
        ));
    }
    Ok(())
}

/// A run's state as restored from a checkpoint (or fresh).
struct Restored<M> {
    model: M,
    optimizer: ModuleOptimizer,
    /// A sharded run's optimizer state, loaded once the shards are planned.
    sharded_state: Option<(PathBuf, Vec<u8>)>,
    history: Vec<EpochMetrics>,
    step: u64,
    last_checkpoint: Option<PathBuf>,
    /// Written inside an epoch: how far that epoch got on each rank.
    mid_epoch: Option<MidEpoch>,
}

/// How this rank's gradients are synchronised and applied.
enum RankSync {
    /// One device: Burn's optimizer on the rank's own gradients.
    Local,
    /// A tensor-parallel rank: Burn's optimizer on its own gradients (averaged with the same
    /// shard's in the other replicas by `ddp` on a mesh), clipped by the norm of the whole
    /// model's gradient over the tensor-parallel group.
    TensorParallel {
        norm: SplitNorm,
        ddp: Option<DistributedDataParallel>,
    },
    /// Data parallel: gradients averaged by DDP, then Burn's optimizer.
    Ddp(DistributedDataParallel),
    /// Data parallel with the optimizer state sharded (ZeRO).
    Zero(ZeroOptimizer),
}

impl RankSync {
    fn collective(&self) -> Option<Arc<dyn Collective>> {
        match self {
            RankSync::Local | RankSync::TensorParallel { ddp: None, .. } => None,
            RankSync::Ddp(d) | RankSync::TensorParallel { ddp: Some(d), .. } => {
                Some(Arc::clone(d.collective()))
            }
            RankSync::Zero(z) => Some(Arc::clone(z.collective())),
        }
    }

    fn updater<'a>(&'a mut self, optimizer: &'a mut ModuleOptimizer) -> Updater<'a> {
        match self {
            RankSync::Local => Updater::Replicated {
                optimizer,
                ddp: None,
                split_norm: None,
            },
            RankSync::TensorParallel { norm, ddp } => Updater::Replicated {
                optimizer,
                ddp: ddp.as_mut(),
                split_norm: Some(norm),
            },
            RankSync::Ddp(ddp) => Updater::Replicated {
                optimizer,
                ddp: Some(ddp),
                split_norm: None,
            },
            RankSync::Zero(zero) => Updater::Sharded(zero),
        }
    }
}

/// What stays fixed over a rank's epochs.
struct RankPlan<'a, M, B> {
    task: RankTask<'a, M, B>,
    sampler: DistributedSampler,
    rank: Rank,
    world: WorldSize,
    local_batch: usize,
    eval_shard: Vec<usize>,
    device: &'a Device,
    collective: Option<Arc<dyn Collective>>,
    tensor_parallel: Option<&'a TensorParallelRank<'a, M>>,
    is_root: bool,
    policy: StepPolicy<'a>,
}

impl<M, B> RankPlan<'_, M, B> {
    /// The group whose ranks must stop after the same step: the tensor-parallel one (or its
    /// whole mesh), else the data-parallel one.
    fn agreement(&self) -> Option<&dyn Collective> {
        self.tensor_parallel
            .map(|tp| &*tp.agreement)
            .or(self.collective.as_deref())
    }
}

/// What a rank's epochs change.
struct RankRun {
    sync: RankSync,
    optimizer: ModuleOptimizer,
    history: Vec<EpochMetrics>,
    /// Optimizer steps of the run before the epoch in progress.
    step: u64,
    /// This rank's part of the epoch a mid-epoch checkpoint was resumed in.
    resumed_progress: Option<EpochProgress>,
    last_checkpoint: Option<PathBuf>,
    progress: Progress,
    events: Option<EventWriter>,
    /// The checkpoint write in flight (reporting rank).
    writer: BackgroundWriter,
}

impl Trainer {
    /// The training run of one rank (the only one, on a single device).
    pub(super) fn fit_rank<M: Module + Sync, B: Send>(
        &self,
        model: M,
        task: RankTask<'_, M, B>,
        resume: Option<(PathBuf, Checkpoint)>,
        setup: RankSetup<'_>,
        tensor_parallel: Option<&TensorParallelRank<'_, M>>,
    ) -> Result<(M, super::FitReport)> {
        let mut restored = self.restore(model, resume, setup.zero, tensor_parallel.is_some())?;
        let resumed_from_epoch = restored.history.len();
        let (model, mut sync) =
            self.synchronise(restored.model, &setup, restored.sharded_state.take())?;
        if let Some(tp) = tensor_parallel {
            sync = tensor_parallel_sync(sync, tp);
        }
        let plan = self.rank_plan(task, &sync, &setup, tensor_parallel)?;
        let progress = Progress::new(if plan.is_root {
            self.verbosity
        } else {
            Verbosity::Quiet
        });
        self.log_start(&progress, resumed_from_epoch, restored.step, plan.world);
        // The checkpoint holds the run up to its step: scalars written after it by a run that
        // died (steps above it) are dropped by TensorBoard.
        let events = plan
            .is_root
            .then(|| EventWriter::create(&self.run_dir, Some(restored.step + 1)))
            .transpose()?;
        let mut state = plan
            .is_root
            .then(|| self.start_state(&plan, &setup, (&sync, resumed_from_epoch)))
            .transpose()?;
        let place = (plan.rank.index(), plan.world.get());
        let resumed_progress = resumed_rank_progress(restored.mid_epoch.take(), place)?;
        let mut run = RankRun {
            sync,
            optimizer: restored.optimizer,
            history: restored.history,
            step: restored.step - resumed_progress.as_ref().map_or(0, |p| p.steps),
            resumed_progress,
            last_checkpoint: restored.last_checkpoint,
            progress,
            events,
            writer: BackgroundWriter::new(self.config.sync_checkpoints),
        };
        let mut result = Ok(model);
        for epoch in resumed_from_epoch..self.config.epochs {
            result = result.and_then(|model| {
                let model = self.run_epoch(&plan, &mut run, model, epoch)?;
                state.as_mut().map_or(Ok(()), |s| s.epoch_done(epoch + 1))?;
                Ok(model)
            });
        }
        // The last checkpoint is on disk before the run reports it.
        let result = result.and_then(|model| run.writer.wait().map(|()| model));
        if let Some(state) = state {
            state.end(&result);
        }
        let model = result?;
        let report = super::FitReport {
            history: run.history,
            resumed_from_epoch,
            last_checkpoint: run.last_checkpoint,
            sharding: match &run.sync {
                RankSync::Zero(z) => Some((z.config().stage, z.memory())),
                _ => None,
            },
            rank_parameter_elements: tensor_parallel.map(|_| model.num_params()),
        };
        Ok((model, report))
    }

    /// The rank's place in its group, its sampler, and its share of each batch.
    fn rank_plan<'a, M, B>(
        &'a self,
        task: RankTask<'a, M, B>,
        sync: &RankSync,
        setup: &RankSetup<'a>,
        tensor_parallel: Option<&'a TensorParallelRank<'a, M>>,
    ) -> Result<RankPlan<'a, M, B>> {
        let collective = sync.collective();
        let (rank, world) = collective
            .as_ref()
            .map_or((Rank::ZERO, WorldSize::ONE), |c| (c.rank(), c.world_size()));
        // In a tensor-parallel group every rank trains on the same data (the sampler's world
        // is the data-parallel one); its rank 0 reports and writes checkpoints.
        let is_root = rank == Rank::ZERO
            && tensor_parallel.is_none_or(|tp| tp.collective.rank() == Rank::ZERO);
        let sampler = DistributedSampler::new(
            task.data.train_len(),
            world,
            DistributedSamplerConfig {
                shuffle: true,
                seed: self.config.seed,
                drop_last: false,
            },
        )?;
        // One rank alone on the CPU runs its steps on the kernels' pool (see `StepPolicy`).
        let on_pool = collective.is_none()
            && tensor_parallel.is_none()
            && setup.pipeline_stages.is_none()
            && kiln_kernels::on_flex(setup.device);
        Ok(RankPlan {
            task,
            sampler,
            rank,
            world,
            local_batch: self.config.batch_size / world.get(),
            eval_shard: (rank.index()..task.data.eval_len())
                .step_by(world.get())
                .collect(),
            device: setup.device,
            collective,
            tensor_parallel,
            is_root,
            policy: StepPolicy {
                on_pool,
                ..StepPolicy::of(&self.config)
            },
        })
    }

    /// `run.json` of a run starting (or resuming) on the reporting rank.
    fn start_state<M, B>(
        &self,
        plan: &RankPlan<'_, M, B>,
        setup: &RankSetup<'_>,
        (sync, epochs_done): (&RankSync, usize),
    ) -> Result<RunStateWriter> {
        // How plain data parallelism averages, where it is not the default.
        let sync_note = match sync {
            RankSync::Ddp(ddp) => ddp.sync_note(),
            _ => None,
        };
        let world = plan.world.get();
        // ZeRO over the data-parallel axis of a mesh.
        let zero = setup
            .zero
            .map_or(String::new(), |z| format!(", ZeRO-{}", z.number()));
        let mode = match (plan.tensor_parallel, setup.pipeline_stages, setup.zero) {
            (Some(tp), stages, _) => {
                let ranks = tp.collective.world_size().get();
                let stages = stages.map_or(String::new(), |p| format!(" x pipeline {p} stages"));
                match world {
                    1 => format!("tensor parallel x{ranks}{stages}"),
                    _ => format!("tensor parallel x{ranks}{stages} x data parallel {world}{zero}"),
                }
            }
            (None, Some(stages), _) if world > 1 => {
                format!("pipeline, {stages} stages x data parallel {world}{zero}")
            }
            (None, Some(stages), _) => format!("pipeline, {stages} stages"),
            (None, None, Some(stage)) => format!("ZeRO-{} x{world}", stage.number()),
            (None, None, None) if world > 1 => match sync_note {
                Some(note) => format!("data parallel x{world}, {note}"),
                None => format!("data parallel x{world}"),
            },
            (None, None, None) => "1 device".to_string(),
        };
        let labels = (
            self.labels.recipe.as_str(),
            self.labels.model.as_str(),
            mode,
        );
        RunStateWriter::start(&self.run_dir, labels, self.config.epochs, epochs_done)
    }

    /// One epoch of a rank: training (in stretches between mid-epoch checkpoints),
    /// evaluation, metrics, scalars and the checkpoint. A stop request ends it at the next
    /// optimizer step with a checkpoint there and [`TrainError::Stopped`].
    fn run_epoch<M: Module + Sync, B: Send>(
        &self,
        plan: &RankPlan<'_, M, B>,
        run: &mut RankRun,
        mut model: M,
        epoch: usize,
    ) -> Result<M> {
        let (config, data, device) = (&self.config, plan.task.data, plan.device);
        let order = plan.sampler.indices(plan.rank, epoch as u64);
        let batches = order.len().div_ceil(plan.local_batch);
        let steps = batches.div_ceil(config.accumulation_steps.get()) as u64;
        run.progress.start_epoch(epoch + 1, config.epochs, batches);
        let make_batch = |indices: &[usize]| data.train_batch(indices, epoch, device);
        let mut progress = run.resumed_progress.take().unwrap_or_default();
        let stop = self.stop.as_ref().map(|s| (s, plan.agreement()));
        let stopped_at_end = loop {
            let until_step = config.checkpoint_every.map(|every| {
                let done = run.step + progress.steps;
                (done / every.get() + 1) * every.get()
            });
            let (trained, end) = train_epoch(
                model,
                &make_batch,
                plan.task.source,
                run.sync.updater(&mut run.optimizer),
                (&order, plan.local_batch),
                &plan.policy,
                run.step,
                EpochReport {
                    progress: &run.progress,
                    events: run.events.as_mut(),
                },
                (&mut progress, Stretch { until_step, stop }),
            )?;
            model = trained;
            match end {
                StretchEnd::EpochDone => break None,
                StretchEnd::Stop(signal) if progress.steps == steps => break Some(signal),
                StretchEnd::Checkpoint => {
                    self.save_mid_epoch(plan, run, &model, &progress)?;
                }
                StretchEnd::Stop(signal) => {
                    self.save_mid_epoch(plan, run, &model, &progress)?;
                    written_everywhere(plan, run)?;
                    let step = run.step + progress.steps;
                    // Every rank names the file rank 0 wrote.
                    let path = step_checkpoint_path(&self.run_dir, run.history.len(), step);
                    return Err(TrainError::Stopped {
                        signal,
                        step,
                        checkpoint: Some(path),
                    });
                }
            }
        };
        run.step += progress.steps;
        run.progress.evaluating();
        let eval = plan.task.eval;
        let eval_sums = evaluate_shard(&model, eval, data, &plan.eval_shard, device, config)?;
        let collective = plan.collective.as_deref();
        let sums = reduce_metrics(collective, progress.sums.clone(), eval_sums)?;
        let metrics = epoch_metrics(epoch + 1, run.step, &progress, plan.world, sums);
        run.progress.end_epoch(config.epochs, &metrics);
        if let Some(events) = run.events.as_mut() {
            write_epoch_scalars(events, &metrics)?;
        }
        run.history.push(metrics);
        let saved = self.save_checkpoint(plan, run, &model, None)?;
        run.last_checkpoint = saved.or(run.last_checkpoint.take());
        match stopped_at_end {
            Some(signal) => {
                written_everywhere(plan, run)?;
                let path = checkpoint_path(&self.run_dir, run.history.len());
                Err(TrainError::Stopped {
                    signal,
                    step: run.step,
                    checkpoint: Some(path),
                })
            }
            None => Ok(model),
        }
    }

    /// A checkpoint inside the epoch in progress: every rank's `progress` gathered, so that
    /// the resumed epoch reports exactly what this one would have.
    fn save_mid_epoch<M: Module, B>(
        &self,
        plan: &RankPlan<'_, M, B>,
        run: &mut RankRun,
        model: &M,
        progress: &EpochProgress,
    ) -> Result<Option<PathBuf>> {
        // Burn keeps a running statistic's (BatchNorm's) latest update pending until the
        // next one or `valid()`, which applies it: without this the checkpoint would hold the
        // statistics one step behind (an epoch's end is synchronised by its evaluation).
        drop(model.valid());
        let ranks = gather_progress(plan.collective.as_deref(), progress)?;
        self.save_checkpoint(plan, run, model, Some(MidEpoch { ranks }))
    }

    fn log_start(
        &self,
        progress: &Progress,
        resumed_from_epoch: usize,
        step: u64,
        world: WorldSize,
    ) {
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
                self.config.batch_size / world.get(),
                self.config.effective_batch()
            ));
        }
    }

    /// The model, optimizer, history and step of `resume`, or a fresh run's. A
    /// tensor-parallel rank's `model` is its `part`, split from the checkpoint's model, and the
    /// checkpoint's optimizer state is already the part's.
    fn restore<M: Module>(
        &self,
        model: M,
        resume: Option<(PathBuf, Checkpoint)>,
        zero: Option<ZeroStage>,
        part: bool,
    ) -> Result<Restored<M>> {
        let optimizer = self.config.build_optimizer();
        let Some((path, checkpoint)) = resume else {
            return Ok(Restored {
                model,
                optimizer,
                sharded_state: None,
                history: Vec::new(),
                step: 0,
                last_checkpoint: None,
                mid_epoch: None,
            });
        };
        self.check_resumable(&path, &checkpoint.state)?;
        let model = match part {
            true => model,
            false => checkpoint.load_model(model, &path)?,
        };
        check_optimizer_saved(&path, &checkpoint.optimizer)?;
        // Kiln writes Burn's record for sharded runs too (gathered); older kilns wrote their
        // own format, which only a sharded run reads.
        let legacy_sharded = checkpoint.optimizer.starts_with(ZERO_STATE_MAGIC);
        let (optimizer, sharded_state) = match (legacy_sharded, zero) {
            (_, Some(_)) => (optimizer, Some((path.clone(), checkpoint.optimizer))),
            (false, None) => {
                let bad =
                    |e: burn::store::RecordError| TrainError::checkpoint(&path, e.to_string());
                let loaded = optimizer
                    .from_bytes(Bytes::from_bytes_vec(checkpoint.optimizer))
                    .map_err(bad)?;
                (loaded, None)
            }
            (true, None) => {
                return Err(TrainError::checkpoint(
                    &path,
                    "its optimizer state is sharded in an older kiln's format (trained with \
                     --zero): resume it with --zero 1 or 2 and data parallelism",
                ));
            }
        };
        Ok(Restored {
            model,
            optimizer,
            sharded_state,
            history: checkpoint.state.history,
            step: checkpoint.state.step,
            last_checkpoint: Some(path),
            mid_epoch: checkpoint.state.mid_epoch,
        })
    }

    /// Joins the rank's group (after the checkpoint is loaded, so that the buckets and
    /// shards see the final parameters): rank 0's parameters everywhere, then DDP or ZeRO.
    fn synchronise<M: Module>(
        &self,
        model: M,
        setup: &RankSetup<'_>,
        sharded_state: Option<(PathBuf, Vec<u8>)>,
    ) -> Result<(M, RankSync)> {
        if setup.zero.is_some() && !self.config.lr_groups.is_empty() {
            return Err(TrainError::Config {
                field: "--zero",
                reason: "a sharded optimizer runs one learning rate; drop the per-group rates \
                         (e.g. --backbone-lr) or --zero"
                    .into(),
            });
        }
        let Some(collective) = setup.collective.clone() else {
            return Ok((model, RankSync::Local));
        };
        let Some(stage) = setup.zero else {
            let (model, mut ddp) = DistributedDataParallel::new(model, collective, setup.buckets)?;
            // A pipeline's stages hold the model being differentiated, not the hooked copy.
            if setup.pipeline_stages.is_some() {
                ddp.set_overlap(false);
            }
            if let Some(reduce) = &setup.device_reduce {
                ddp.set_device_reduce(Some(Arc::clone(reduce)));
            }
            return Ok((model, RankSync::Ddp(ddp)));
        };
        let zero_config = ZeroConfig {
            stage,
            optimizer: self.config.optimizer.flat(),
        };
        let (model, mut zero) = ZeroOptimizer::new(model, collective, zero_config)?;
        if let Some((path, bytes)) = sharded_state {
            let bad = |reason: String| TrainError::checkpoint(&path, reason);
            if bytes.starts_with(ZERO_STATE_MAGIC) {
                zero.load_state_bytes(&bytes)
                    .map_err(|e| bad(e.to_string()))?;
            } else {
                let states = zero_state::from_record(bytes, zero_config.optimizer).map_err(bad)?;
                zero.load_state(&states).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok((model, RankSync::Zero(zero)))
    }

    /// Writes the checkpoint of the epoch just finished, or with `mid_epoch` of the step
    /// reached inside the epoch in progress (rank 0; every rank takes part in gathering a
    /// sharded optimizer state or a tensor-parallel model), the metrics log at an epoch's
    /// end, and removes the mid-epoch checkpoints it supersedes.
    fn save_checkpoint<M: Module, B>(
        &self,
        plan: &RankPlan<'_, M, B>,
        run: &mut RankRun,
        model: &M,
        mid_epoch: Option<MidEpoch>,
    ) -> Result<Option<PathBuf>> {
        let (epoch, history) = (run.history.len(), &run.history);
        let step = run.step + mid_epoch.as_ref().map_or(0, MidEpoch::steps);
        let path = match mid_epoch {
            Some(_) => step_checkpoint_path(&self.run_dir, epoch, step),
            None => checkpoint_path(&self.run_dir, epoch),
        };
        // Every rank of a sharded or tensor-parallel run takes part in gathering.
        let Some((model_bytes, optimizer_bytes)) =
            self.checkpoint_records(plan, run, model, &path)?
        else {
            return Ok(None);
        };
        let is_epoch_end = mid_epoch.is_none();
        let checkpoint = Checkpoint {
            state: TrainerState {
                recipe: self.labels.recipe.clone(),
                model: self.labels.model.clone(),
                quantization: self.labels.quantization.clone(),
                options: self.labels.options.clone(),
                epoch,
                step,
                config: self.config.clone(),
                history: history.to_vec(),
                mid_epoch,
            },
            model: model_bytes,
            optimizer: optimizer_bytes,
        };
        let (run_dir, retention) = (self.run_dir.clone(), self.config.retention.clone());
        let (written, history) = (path.clone(), history.clone());
        run.writer.submit(move || {
            write_checkpoint_atomic(&written, &checkpoint)?;
            if is_epoch_end {
                write_metrics_jsonl(&run_dir, &history)?;
                apply_retention(&run_dir, &retention, &history)?;
            }
            remove_superseded_mid_epoch(&run_dir, &written)
        })?;
        Ok(Some(path))
    }

    /// The model's and the optimizer's records as a single device would write them, on the
    /// reporting rank (`None` elsewhere): a ZeRO state gathered from the shards, a
    /// tensor-parallel part's gathered into the whole model. Every rank calls it.
    fn checkpoint_records<M: Module, B>(
        &self,
        plan: &RankPlan<'_, M, B>,
        run: &RankRun,
        model: &M,
        path: &Path,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let writes = plan.is_root || plan.tensor_parallel.is_some();
        let optimizer = match &run.sync {
            RankSync::Zero(zero) => {
                let states = zero.gather_state()?;
                let record = |s| zero_state::to_record(model, zero.config().optimizer, s);
                writes
                    .then(|| record(states).map_err(|r| TrainError::checkpoint(path, r)))
                    .transpose()?
            }
            _ if writes => Some(record_bytes(path, run.optimizer.into_bytes())?),
            _ => None,
        };
        let records = match (plan.tensor_parallel, optimizer) {
            (Some(tp), Some(optimizer)) => Some((tp.whole)(model, optimizer)?),
            (None, Some(optimizer)) => Some((
                record_bytes(path, model.clone().into_record().into_bytes())?,
                optimizer,
            )),
            (_, None) => None,
        };
        Ok(records.filter(|_| plan.is_root))
    }

    pub(super) fn check_resumable(&self, path: &Path, state: &TrainerState) -> Result<()> {
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
            let keys: std::collections::BTreeSet<&String> = state
                .options
                .keys()
                .chain(self.labels.options.keys())
                .collect();
            let show =
                |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
            let changed: Vec<String> = keys
                .into_iter()
                .filter(|k| state.options.get(*k) != self.labels.options.get(*k))
                .map(|k| {
                    format!(
                        "{k} {} (now {})",
                        show(state.options.get(k)),
                        show(self.labels.options.get(k))
                    )
                })
                .collect();
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "it was trained with other {} settings: {}; resume with the same",
                    state.recipe,
                    changed.join(", ")
                ),
            ));
        }
        let differences = state.config.differences(&self.config);
        if !differences.is_empty() {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "it was trained with other settings: {}; resume with the same settings \
                     (only --epochs may change)",
                    differences.join(", ")
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

/// A tensor-parallel rank's synchronisation: its group's clipping norm, after the average
/// over the data-parallel replicas when there are several (DDP), or inside the ZeRO step
/// that shards the part's optimizer state over them.
fn tensor_parallel_sync<P>(sync: RankSync, tp: &TensorParallelRank<'_, P>) -> RankSync {
    let norm = SplitNorm {
        collective: Arc::clone(&tp.collective),
        split: tp.split_params.iter().copied().collect(),
    };
    match sync {
        RankSync::Local => RankSync::TensorParallel { norm, ddp: None },
        // The replicas' all-reduce stays after backward: during backward the group's own
        // sums run, and two threads on two MPI communicators at once are not assumed.
        RankSync::Ddp(mut ddp) => {
            ddp.set_overlap(false);
            RankSync::TensorParallel {
                norm,
                ddp: Some(ddp),
            }
        }
        // Each part's state sharded over its data-parallel replicas.
        RankSync::Zero(mut zero) => {
            zero.set_split_norm(norm.collective, &norm.split);
            RankSync::Zero(zero)
        }
        tensor_parallel @ RankSync::TensorParallel { .. } => tensor_parallel,
    }
}

/// Loss and metric sums of `eval` over this rank's evaluation samples `shard`, the model in
/// evaluation mode on the device without autodiff.
fn evaluate_shard<M: Module, B>(
    model: &M,
    eval: &StepFn<'_, M, B>,
    data: &dyn Batches<B>,
    shard: &[usize],
    device: &Device,
    config: &TrainerConfig,
) -> Result<MetricSums> {
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let batch_size = NonZeroUsize::new(config.eval_batch_size)
        .expect("TrainerConfig::validate, called in Trainer::new, rejects a zero eval_batch_size");
    let mut sums = MetricSums::default();
    for chunk in shard.chunks(batch_size.get()) {
        let out =
            eval(&model, data.eval_batch(chunk, &device)?).map_err(|source| TrainError::Step {
                phase: "evaluation",
                source,
            })?;
        sums.add(scalar_loss(&out)?, out.items, &out.metrics);
    }
    Ok(sums)
}

/// The training and evaluation sums of all ranks.
fn reduce_metrics(
    collective: Option<&dyn Collective>,
    mut train: MetricSums,
    mut eval: MetricSums,
) -> Result<(MetricSums, MetricSums)> {
    let Some(collective) = collective else {
        return Ok((train, eval));
    };
    let mut values = train.to_values();
    let train_len = values.len();
    values.extend(eval.to_values());
    all_reduce_sum_f64(collective, &mut values)?;
    train.read_values(&values[..train_len]);
    eval.read_values(&values[train_len..]);
    Ok((train, eval))
}

/// An epoch's row of the history from its outcome and the ranks' summed metrics.
fn epoch_metrics(
    epoch: usize,
    step: u64,
    outcome: &EpochProgress,
    world: WorldSize,
    (train, eval): (MetricSums, MetricSums),
) -> EpochMetrics {
    let mut test_metrics = eval.values();
    let test_accuracy = test_metrics.remove("accuracy");
    EpochMetrics {
        epoch,
        step,
        train_loss: train.mean_loss(),
        test_loss: eval.mean_loss(),
        test_accuracy,
        train_metrics: train.values(),
        test_metrics,
        samples_per_sec: (outcome.samples * world.get()) as f64 / outcome.seconds.max(1e-9),
        train_seconds: outcome.seconds,
        bubble_fraction: outcome.bubble(),
        exchange_fraction: (world.get() > 1)
            .then(|| outcome.exchange_seconds / outcome.seconds.max(1e-9)),
    }
}

/// Waits until the checkpoint in flight is on disk, and every rank with it: a launcher may
/// end the job as soon as one rank returns, which must not be before rank 0 has written.
fn written_everywhere<M, B>(plan: &RankPlan<'_, M, B>, run: &mut RankRun) -> Result<()> {
    run.writer.wait()?;
    if let Some(group) = plan.agreement() {
        group.barrier()?;
    }
    Ok(())
}

/// The TensorBoard scalars of a finished epoch, at its last step.
fn write_epoch_scalars(events: &mut EventWriter, m: &EpochMetrics) -> Result<()> {
    events.scalar("loss/train", m.step, m.train_loss)?;
    events.scalar("loss/validation", m.step, m.test_loss)?;
    if let Some(accuracy) = m.test_accuracy {
        events.scalar("accuracy/validation", m.step, accuracy)?;
    }
    for (name, value) in &m.train_metrics {
        events.scalar(&format!("train/{name}"), m.step, *value)?;
    }
    for (name, value) in &m.test_metrics {
        events.scalar(&format!("validation/{name}"), m.step, *value)?;
    }
    events.scalar("speed/samples_per_sec", m.step, m.samples_per_sec)?;
    events.scalar("epoch", m.step, m.epoch as f64)?;
    if let Some(bubble) = m.bubble_fraction {
        events.scalar("parallel/bubble_fraction", m.step, bubble)?;
    }
    if let Some(exchange) = m.exchange_fraction {
        events.scalar("parallel/exchange_fraction", m.step, exchange)?;
    }
    events.flush()
}
