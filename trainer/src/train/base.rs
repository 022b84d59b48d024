use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Bytes, Device, Tensor};
use kiln_multi::data_parallel::{BurnAllReduce, DeviceAllReduce, DeviceReduce};
use kiln_multi::pipeline::{
    Activation, Pipeline, PipelineConfig, PipelineStage, Targets, merge_grads,
};
use kiln_multi::{
    Collective, CollectiveConfig, MeshRank, MeshShape, ShardMemory, Transport, WorldSize,
    ZeroStage, run_group, run_mesh,
};

use super::data::Batches;
use super::data::{Data, TrainData};
use super::epoch::{GradSource, StepGrads};
use super::execution::Execution;
use super::rank::{RankSetup, RankTask, TensorParallelRank, check_splittable_state};
use super::tp_state;
use crate::checkpoint::{Checkpoint, EpochMetrics};
use crate::config::TrainerConfig;
use crate::data::ImageBatch;
use crate::error::{Result, TrainError};
use crate::report::Verbosity;
use crate::step::{GradStep, StepOutput, StepResult, classification_output};

pub use super::labels::RunLabels;

/// A step of a model `M` on a batch `B`: its loss and metrics.
pub type StepFn<'a, M, B> = dyn Fn(&M, B) -> StepResult<StepOutput> + Sync + 'a;

/// How [`Trainer::fit_pipeline_model`] feeds a pipeline: a training batch as the first
/// stage's input and the targets of the last stage's cross-entropy.
pub type PipelineInputs<'a, B> = dyn Fn(B) -> (Activation, Targets) + Sync + 'a;

/// A training step of a model `M` on a batch `B` that runs its own backward.
pub type GradStepFn<'a, M, B> = dyn Fn(&M, B) -> StepResult<GradStep> + Sync + 'a;

/// The steps of a tensor-parallel rank's part `P` of a model, for
/// [`Trainer::fit_tensor_parallel_model`].
pub struct TensorParallelSteps<'a, P, B> {
    /// The loss and gradients of the rank's part on a training batch (every rank gets the
    /// same batch and calls it together); the trainer then applies the split's
    /// `sync_gradients` and the optimizer.
    pub train: &'a GradStepFn<'a, P, B>,
    /// The loss and metrics on an evaluation batch, with the part in evaluation mode.
    pub eval: &'a StepFn<'a, P, B>,
}

/// The steps of a model for [`Trainer::fit_model`]: Lightning's `training_step` and
/// `validation_step`.
pub struct Steps<'a, M, B> {
    /// Maps the model and a training batch to the loss to minimise and the metrics to
    /// report; the trainer runs backward, synchronisation and the optimizer.
    pub train: &'a StepFn<'a, M, B>,
    /// The same on an evaluation batch, with the model in evaluation mode (`Module::valid`)
    /// on the device without autodiff.
    pub eval: &'a StepFn<'a, M, B>,
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

/// Trains any Burn model: an optimizer with its schedule, clipping and accumulation,
/// evaluation and an atomic checkpoint after every epoch, exact resume, in every execution
/// mode.
pub struct Trainer {
    pub(super) config: TrainerConfig,
    pub(super) run_dir: PathBuf,
    pub(super) labels: RunLabels,
    pub(super) verbosity: Verbosity,
    pub(super) stop: Option<crate::StopSignal>,
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
            stop: None,
        })
    }

    /// Sets how much is printed on stderr (default: progress bar and a line per epoch).
    pub fn with_verbosity(mut self, verbosity: Verbosity) -> Self {
        self.verbosity = verbosity;
        self
    }

    /// Stops the run cleanly when `stop` is requested (e.g. [`StopSignal::process`] after
    /// [`StopSignal::install_handlers`]: SIGTERM, SIGINT): after the optimizer step in progress,
    /// which every rank agrees on, with a checkpoint there; `fit` then returns
    /// [`TrainError::Stopped`]. Without it, signals keep their default effect.
    ///
    /// [`StopSignal::process`]: crate::StopSignal::process
    /// [`StopSignal::install_handlers`]: crate::StopSignal::install_handlers
    pub fn with_stop(mut self, stop: crate::StopSignal) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Trains any `model` on any data through its `steps`, up to `config.epochs` epochs, as
    /// `execution` says, and returns it (rank 0's replica when data parallel in this process;
    /// this rank's, identical to it, across processes).
    ///
    /// Each optimizer step averages the gradients of `accumulation_steps` batches of
    /// `batch_size` items (the global batch: data parallel over N ranks, each rank takes
    /// `batch_size / N` of them and the gradients are averaged over the ranks too), clips them
    /// to `clip_grad_norm`, and steps the optimizer at the schedule's rate: the update of one
    /// device on the same items. Evaluation is split over the ranks; metrics are summed over
    /// batches and ranks. Rank 0 alone prints and writes checkpoints.
    ///
    /// With `resume`, the model, optimizer state, step count (the schedule's position) and
    /// metric history are restored and training continues at the next epoch, whose shuffle
    /// depends only on (seed, epoch): the result is that of an uninterrupted run.
    ///
    /// On one CPU device (`Execution::Single` on Flex) `steps.train` and the optimizer step
    /// run on a thread of rayon's global pool ([`kiln_kernels::on_pool`]): a step may use
    /// rayon, but must not wait for work that only that pool would run.
    ///
    /// # Errors
    /// [`TrainError::Step`] when a step fails; [`TrainError::Dataset`] when an item cannot be
    /// read; [`TrainError::Checkpoint`] when `resume` does not belong to this run or does not
    /// load; [`TrainError::Io`] when a checkpoint or the metrics log cannot be written;
    /// [`TrainError::Config`] when the batch does not split evenly over the ranks;
    /// [`TrainError::Multi`] for an empty training set or a failed rank.
    pub fn fit_model<M: Module + Sync, I, B: Send>(
        &self,
        model: M,
        steps: Steps<'_, M, B>,
        data: Data<'_, I, B>,
        resume: Option<(PathBuf, Checkpoint)>,
        execution: &Execution,
    ) -> Result<(M, FitReport)> {
        let source = backward_source(steps.train);
        let task = RankTask {
            source: &source,
            eval: steps.eval,
            data: &data,
        };
        self.fit_any(model, task, resume, execution)
    }

    /// Trains an image classifier with cross-entropy (the ready-made
    /// [`classification_output`] step over `forward`'s logits), as
    /// [`fit_model`](Self::fit_model) does.
    ///
    /// # Errors
    /// As [`fit_model`](Self::fit_model).
    pub fn fit<M, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        execution: &Execution,
    ) -> Result<(M, FitReport)>
    where
        M: Module + Sync,
        F: Fn(&M, Tensor<4>) -> Tensor<2> + Sync,
    {
        let step = classification_step(&forward);
        let source = backward_source(&step);
        let task = RankTask {
            source: &source,
            eval: &step,
            data: &data,
        };
        self.fit_any(model, task, resume, execution)
    }

    /// Refuses a fresh run (no `resume`) into a run directory that already holds
    /// checkpoints, which it would overwrite. Every process of a group checks before the
    /// first exchange, so rank 0 cannot have written yet.
    fn check_fresh(&self, resume: Option<&(PathBuf, Checkpoint)>) -> Result<()> {
        if resume.is_none() && crate::checkpoint::latest_checkpoint(&self.run_dir)?.is_some() {
            return Err(TrainError::Config {
                field: "run directory",
                reason: format!(
                    "{} already holds checkpoints: resume that run from its latest checkpoint, \
                     or train into another directory",
                    self.run_dir.display()
                ),
            });
        }
        Ok(())
    }

    /// Every execution mode of [`fit_model`](Self::fit_model) and [`fit`](Self::fit).
    fn fit_any<M: Module + Sync, B: Send>(
        &self,
        model: M,
        task: RankTask<'_, M, B>,
        resume: Option<(PathBuf, Checkpoint)>,
        execution: &Execution,
    ) -> Result<(M, FitReport)> {
        self.check_fresh(resume.as_ref())?;
        if task.data.eval_len() == 0 {
            return Err(TrainError::Config {
                field: "evaluation data",
                reason: "is empty: every epoch ends with an evaluation, which needs at least \
                         one item"
                    .into(),
            });
        }
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
        let run = |model: M, setup: RankSetup<'_>, resume| {
            self.fit_rank(model, task, resume, setup, None)
        };
        match execution {
            Execution::Single(device) => run(model, RankSetup::single(device), resume),
            Execution::DataParallel(dp) => {
                let replicas = Replicas::fork(&model, &dp.devices);
                let device_reduce = device_all_reduce(dp);
                let ranks = run_group(world, dp.collective, &dp.transport, |collective| {
                    let rank = collective.rank().index();
                    let setup = RankSetup {
                        device: &dp.devices[rank],
                        collective: Some(collective),
                        buckets: dp.buckets,
                        zero: dp.zero,
                        pipeline_stages: None,
                        device_reduce: device_reduce.clone(),
                    };
                    run(replicas.take(rank), setup, resume.clone())
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
                    pipeline_stages: None,
                    device_reduce: None,
                };
                run(model.fork(&group.device), setup, resume)
            }
        }
    }

    /// Trains `model` with tensor parallelism (Megatron-style): each of `split.devices.len()`
    /// ranks (threads) holds `split.split`'s part of the model, whose forward exchanges
    /// activations with the other ranks; every rank sees the same batches, the replicated
    /// layers' gradients are summed by `split.sync_gradients`, and each rank's optimizer steps
    /// its own part. Rank 0 reports; checkpoints hold the whole model (`split.gather`), so
    /// `eval`, `predict` and `quantize` read them like any other. Returns the whole model.
    /// With `split.data_parallel`, that many such groups train as data-parallel replicas on a
    /// 2-D mesh ([`kiln_multi::run_mesh`]), each shard's gradients averaged over its replicas.
    ///
    /// Checkpoints hold the whole model's optimizer state too (each rank's gathered into the
    /// whole model's layout), the same file a single device writes: a run resumes on any
    /// number of tensor-parallel ranks, or none, and continues as it would have.
    ///
    /// # Errors
    /// As [`fit`](Self::fit) (a `resume` checkpoint in an older kiln's sharded ZeRO format is
    /// refused);
    /// [`TrainError::Config`] for replicas over NCCL; [`TrainError::Multi`] when a rank fails
    /// or times out.
    pub fn fit_tensor_parallel<M, P, F>(
        &self,
        model: M,
        forward: F,
        data: TrainData<'_>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: TensorParallelSplit<'_, M, P>,
    ) -> Result<(M, FitReport)>
    where
        M: Module + Sync,
        P: Module + Sync,
        F: Fn(&P, Tensor<4>) -> Tensor<2> + Sync,
    {
        let step = classification_step(&forward);
        let source = backward_source(&step);
        self.fit_tp(model, (&source, &step), &data, resume, split)
    }

    /// Tensor parallelism for any model and data, as
    /// [`fit_tensor_parallel`](Self::fit_tensor_parallel) does for a classifier: each rank
    /// trains its part `P` through `steps`, whose training step runs its own backward (with
    /// the collectives the split needs between its parts).
    ///
    /// # Errors
    /// As [`fit_tensor_parallel`](Self::fit_tensor_parallel).
    pub fn fit_tensor_parallel_model<M, P, I, B: Send>(
        &self,
        model: M,
        steps: TensorParallelSteps<'_, P, B>,
        data: Data<'_, I, B>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: TensorParallelSplit<'_, M, P>,
    ) -> Result<(M, FitReport)>
    where
        M: Module + Sync,
        P: Module + Sync,
    {
        let source = |part: &P, batch: B| -> Result<StepGrads> {
            let step = (steps.train)(part, batch).map_err(|source| TrainError::Step {
                phase: "training",
                source,
            })?;
            Ok(StepGrads {
                loss: scalar_loss(&step.output)?,
                items: step.output.items,
                metrics: step.output.metrics,
                grads: step.grads,
                bubble: None,
            })
        };
        self.fit_tp(model, (&source, steps.eval), &data, resume, split)
    }

    /// Every tensor-parallel run: `part_steps` are the gradient source and evaluation step of
    /// a rank's part.
    fn fit_tp<M: Module, P: Module + Sync, B: Send>(
        &self,
        model: M,
        part_steps: (&GradSource<'_, P, B>, &StepFn<'_, P, B>),
        data: &dyn Batches<B>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: TensorParallelSplit<'_, M, P>,
    ) -> Result<(M, FitReport)> {
        self.check_fresh(resume.as_ref())?;
        if split.zero.is_some() && split.data_parallel.is_none() {
            return Err(TrainError::Config {
                field: "--zero",
                reason: "ZeRO shards each part's optimizer state over its data-parallel \
                         replicas, and this tensor-parallel run has one: add a data-parallel \
                         axis (e.g. --ranks 2, or dp=2 in --mesh)"
                    .into(),
            });
        }
        let tensor = WorldSize::new(split.devices.len())?;
        // The ranks of this process: one under a launcher, else the whole mesh.
        let mesh = match (&split.process_group, split.data_parallel) {
            (Some(_), _) => MeshShape {
                data: WorldSize::ONE,
                tensor: WorldSize::ONE,
            },
            (None, data) => MeshShape {
                data: data.unwrap_or(WorldSize::ONE),
                tensor,
            },
        };
        // Rank `replica * tensor + shard` runs shard `shard` on its device.
        let devices: Vec<Device> = (0..mesh.world().get())
            .map(|rank| split.devices[rank % tensor.get()].clone())
            .collect();
        let replicas = Replicas::fork(&model, &devices);
        let (plain, eval) = part_steps;
        let rank = |index: usize, groups: MeshRank| -> Result<(M, FitReport)> {
            let collective = &*groups.tensor;
            let mut split_whole =
                |whole: M| -> Result<P> { Ok((split.split)(&whole, Arc::clone(&groups.tensor))?) };
            let (part, resume) =
                self.tensor_parallel_start(replicas.take(index), resume.clone(), &mut split_whole)?;
            let whole = |part: &P, optimizer: Vec<u8>| -> Result<(Vec<u8>, Vec<u8>)> {
                let whole = (split.gather)(part, collective)?;
                let mut gather = |p: P| -> Result<M> { Ok((split.gather)(&p, collective)?) };
                let state = tp_state::part_to_whole(part, optimizer, &whole, &mut gather)?
                    .map_err(|reason| TrainError::checkpoint(&self.run_dir, reason))?;
                let model = whole.into_record().into_bytes().map_err(|e| {
                    TrainError::checkpoint(&self.run_dir, format!("cannot serialise record: {e}"))
                })?;
                Ok((model.to_vec(), state))
            };
            let tp = TensorParallelRank {
                collective: Arc::clone(&groups.tensor),
                agreement: Arc::clone(&groups.world),
                split_params: (split.split_params)(&part),
                whole: &whole,
            };
            let source = |part: &P, batch: B| -> Result<StepGrads> {
                let mut out = plain(part, batch)?;
                (split.sync_gradients)(part, &mut out.grads, collective)?;
                Ok(out)
            };
            let setup = RankSetup {
                collective: split
                    .data_parallel
                    .is_some()
                    .then(|| Arc::clone(&groups.data)),
                pipeline_stages: split.pipeline_stages,
                zero: split.zero,
                ..RankSetup::single(&devices[index])
            };
            let task = RankTask {
                source: &source,
                eval,
                data,
            };
            let (part, report) = self.fit_rank(part, task, resume, setup, Some(&tp))?;
            Ok(((split.gather)(&part, collective)?, report))
        };
        let ranks = match (&split.process_group, split.data_parallel) {
            // This process is one rank of the group: its own part, no threads.
            (Some(group), None) => vec![rank(
                0,
                MeshRank {
                    world: Arc::clone(group),
                    data: Arc::clone(group),
                    tensor: Arc::clone(group),
                },
            )?],
            // One rank of a launched mesh: its groups split from the job's.
            (Some(group), Some(data)) => vec![rank(0, process_mesh(group, data)?)?],
            (None, None) => run_group(tensor, split.collective, &split.transport, |group| {
                let groups = MeshRank {
                    world: Arc::clone(&group),
                    data: Arc::clone(&group),
                    tensor: group,
                };
                rank(groups.tensor.rank().index(), groups)
            })?,
            (None, Some(_)) if split.transport != Transport::SharedMemory => {
                return Err(TrainError::Config {
                    field: "--ranks",
                    reason: "data-parallel replicas of a tensor-parallel model run over \
                             shared memory only (CPU ranks), not NCCL, for now"
                        .into(),
                });
            }
            (None, Some(_)) => run_mesh(mesh, split.collective, |groups| {
                rank(groups.world.rank().index(), groups.clone())
            })?,
        };
        Ok(ranks
            .into_iter()
            .next()
            .expect("a world has at least rank 0"))
    }

    /// A tensor-parallel rank's part of `whole` and its resume point: the checkpoint's model
    /// loaded, then split, and its optimizer state (the whole model's) moved to the part.
    fn tensor_parallel_start<M: Module, P: Module>(
        &self,
        whole: M,
        resume: Option<(PathBuf, Checkpoint)>,
        split: &mut dyn FnMut(M) -> Result<P>,
    ) -> Result<(P, Option<(PathBuf, Checkpoint)>)> {
        let Some((path, mut checkpoint)) = resume else {
            return Ok((split(whole)?, None));
        };
        self.check_resumable(&path, &checkpoint.state)?;
        check_splittable_state(&path, &checkpoint.optimizer)?;
        let whole = checkpoint.load_model(whole, &path)?;
        let part = split(whole.clone())?;
        let optimizer = std::mem::take(&mut checkpoint.optimizer);
        checkpoint.optimizer = tp_state::whole_to_part(&whole, optimizer, &part, split)?
            .map_err(|reason| TrainError::checkpoint(&path, reason))?;
        Ok((part, Some((path, checkpoint))))
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
        M: Module + Sync,
        F: Fn(&M, Tensor<4>) -> Tensor<2> + Sync,
    {
        let inputs = |batch: ImageBatch| {
            (
                Activation::Rank4(batch.images),
                Targets::Classes(batch.targets),
            )
        };
        let eval = classification_step(&forward);
        self.fit_pp(model, (&inputs, &eval), &data, resume, split)
    }

    /// A pipeline for any model and data, as [`fit_pipeline`](Self::fit_pipeline) does for a
    /// classifier: `inputs` turns a training batch into the first stage's input and the
    /// targets of the last stage's cross-entropy (classes, or a language model's next tokens);
    /// `eval` evaluates the whole model.
    ///
    /// # Errors
    /// As [`fit_pipeline`](Self::fit_pipeline).
    pub fn fit_pipeline_model<M: Module + Sync, I, B: Send>(
        &self,
        model: M,
        inputs: &PipelineInputs<'_, B>,
        eval: &StepFn<'_, M, B>,
        data: Data<'_, I, B>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: PipelineSplit<'_, M>,
    ) -> Result<(M, FitReport)> {
        self.fit_pp(model, (inputs, eval), &data, resume, split)
    }

    /// Every pipeline run.
    fn fit_pp<M: Module + Sync, B: Send>(
        &self,
        model: M,
        (inputs, eval): (&PipelineInputs<'_, B>, &StepFn<'_, M, B>),
        data: &dyn Batches<B>,
        resume: Option<(PathBuf, Checkpoint)>,
        split: PipelineSplit<'_, M>,
    ) -> Result<(M, FitReport)> {
        self.check_fresh(resume.as_ref())?;
        // One pipeline per rank: its stages' thread pools are its own (ranks sharing a pool
        // would wait for each other's stages and deadlock).
        let run = |model: M, setup: RankSetup<'_>, resume| {
            let pipeline = Pipeline::new(split.stages, split.config)?;
            let source = |model: &M, batch: B| -> Result<StepGrads> {
                let (input, targets) = inputs(batch);
                let items = targets.count();
                let mut stages = (split.split)(model);
                let report = pipeline.run(&mut stages, input, targets)?;
                Ok(StepGrads {
                    loss: report.loss,
                    items,
                    metrics: Vec::new(),
                    bubble: Some(report.bubble_fraction()),
                    grads: merge_grads(model, &mut stages),
                })
            };
            let task = RankTask {
                source: &source,
                eval,
                data,
            };
            self.fit_rank(model, task, resume, setup, None)
        };
        if let Some(group) = &split.process_group {
            // This process is one data-parallel rank of a launched job, with its pipeline.
            let setup = RankSetup {
                collective: Some(Arc::clone(group)),
                zero: split.zero,
                pipeline_stages: Some(split.stages),
                ..RankSetup::single(&split.device)
            };
            return run(model.fork(&split.device), setup, resume);
        }
        let Some(ranks) = split.data_parallel else {
            let setup = RankSetup {
                pipeline_stages: Some(split.stages),
                ..RankSetup::single(&split.device)
            };
            return run(model, setup, resume);
        };
        // Data parallel over pipelines: each rank (thread) streams its share of every batch
        // through a pipeline of its own, then the ranks average their merged gradients.
        let devices = vec![split.device.clone(); ranks.get()];
        let replicas = Replicas::fork(&model, &devices);
        let collective = CollectiveConfig {
            timeout: split.config.timeout,
        };
        let ranks = run_group(ranks, collective, &Transport::SharedMemory, |collective| {
            let rank = collective.rank().index();
            let setup = RankSetup {
                device: &split.device,
                collective: Some(collective),
                buckets: kiln_multi::BucketConfig::default(),
                zero: split.zero,
                pipeline_stages: Some(split.stages),
                device_reduce: None,
            };
            run(replicas.take(rank), setup, resume.clone())
        })?;
        Ok(ranks
            .into_iter()
            .next()
            .expect("a world has at least rank 0"))
    }
}

/// This process's groups in a launched mesh of `data` replicas over `group`'s ranks (rank =
/// replica x tensor + shard, as [`MeshShape::coordinates`]).
fn process_mesh(group: &Arc<dyn Collective>, data: WorldSize) -> Result<MeshRank> {
    let world = group.world_size().get();
    if !world.is_multiple_of(data.get()) {
        return Err(TrainError::Config {
            field: "--ranks",
            reason: format!(
                "{} data-parallel replicas do not divide the job's {world} processes",
                data.get()
            ),
        });
    }
    let mesh = MeshShape {
        data,
        tensor: WorldSize::new(world / data.get())?,
    };
    let (replica, shard) = mesh.coordinates(group.rank());
    let tensor = group.split(replica, shard)?;
    let data = group.split(shard, replica)?;
    Ok(MeshRank {
        world: Arc::clone(group),
        data,
        tensor,
    })
}

/// The ready-made classification step over a forward function.
fn classification_step<'a, M, F>(
    forward: &'a F,
) -> impl Fn(&M, ImageBatch) -> StepResult<StepOutput> + Sync + 'a
where
    F: Fn(&M, Tensor<4>) -> Tensor<2> + Sync,
{
    move |model: &M, batch: ImageBatch| {
        Ok(classification_output(
            forward(model, batch.images),
            batch.targets,
        ))
    }
}

/// In-process ranks on CUDA GPUs with `KILN_DEVICE_ALL_REDUCE=burn`: gradient buckets
/// averaged on the devices by Burn's all-reduce (NCCL on device memory) instead of through the
/// host (`=nccl` is kiln's NCCL engine on the same memory, which DDP picks by itself). Opt-in
/// until it has run on a machine with two GPUs (`scripts/gpu-check` compares the paths).
fn device_all_reduce(dp: &super::execution::DataParallelConfig) -> Option<Arc<dyn DeviceReduce>> {
    let asked = DeviceAllReduce::from_env() == DeviceAllReduce::Burn;
    (asked && matches!(dp.transport, Transport::Nccl { .. })).then(|| {
        let devices = dp
            .devices
            .iter()
            .map(|d| d.clone().without_autodiff())
            .collect();
        Arc::new(BurnAllReduce { devices }) as Arc<dyn DeviceReduce>
    })
}

/// A gradient source that runs `step` and backward on its loss.
fn backward_source<'a, M: Module, B>(
    step: &'a StepFn<'a, M, B>,
) -> impl Fn(&M, B) -> Result<StepGrads> + Sync + 'a {
    move |model: &M, batch: B| {
        let out = step(model, batch).map_err(|source| TrainError::Step {
            phase: "training",
            source,
        })?;
        let loss = scalar_loss(&out)?;
        let grads = GradientsParams::from_grads(out.loss.backward(), model);
        Ok(StepGrads {
            loss,
            items: out.items,
            metrics: out.metrics,
            grads,
            bubble: None,
        })
    }
}

/// The value of a step's one-element loss.
pub(super) fn scalar_loss(out: &StepOutput) -> Result<f64> {
    match out.loss.dims() {
        [1] => Ok(out.loss.clone().into_scalar::<f64>()),
        [n] => Err(TrainError::Step {
            phase: "training",
            source: format!("the loss must have one element (the batch mean), it has {n}").into(),
        }),
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
    /// Data-parallel pipelines: this many ranks (threads of this process), each with its own
    /// pipeline of `stages` stages on its share of every batch, gradients averaged over the
    /// ranks. `None`: one pipeline.
    pub data_parallel: Option<WorldSize>,
    /// With `data_parallel` or `process_group`: shard the optimizer state (and gradients)
    /// over the data-parallel ranks.
    pub zero: Option<ZeroStage>,
    /// This process is one data-parallel rank of a group started outside (e.g. MPI under
    /// `kiln launch`), running its own pipeline on its share of every batch.
    pub process_group: Option<Arc<dyn Collective>>,
}

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
    /// The parameters of a part that hold the rank's share of a split layer (the others are
    /// replicated): gradient clipping's norm counts them on every rank, the replicated ones
    /// once (e.g. [`ColumnParallelLinear::split_params`] and
    /// [`RowParallelLinear::split_params`] of its layers).
    ///
    /// [`ColumnParallelLinear::split_params`]: kiln_multi::tensor_parallel::ColumnParallelLinear::split_params
    /// [`RowParallelLinear::split_params`]: kiln_multi::tensor_parallel::RowParallelLinear::split_params
    pub split_params: &'a (dyn Fn(&P) -> Vec<burn::module::ParamId> + Sync + 'a),
    /// A 2-D mesh: this many data-parallel replicas (threads) of the tensor-parallel group,
    /// each on its share of every batch, the same shard's gradients averaged over the
    /// replicas. `None`: one group.
    pub data_parallel: Option<WorldSize>,
    /// This process is one rank of a tensor-parallel group started outside (e.g. MPI under
    /// `kiln launch`): no threads are started and `devices` holds this rank's device; with
    /// `data_parallel` D, the job is a mesh of D replicas whose groups are split from this one
    /// ([`Collective::split`]), else the group is the tensor-parallel one.
    pub process_group: Option<Arc<dyn Collective>>,
    /// The pipeline stages each part runs its layers in, when its step does (a label for
    /// `run.json`'s mode: the trainer does not see inside the step).
    pub pipeline_stages: Option<NonZeroUsize>,
    /// With `data_parallel` replicas: shard each part's optimizer state (and with stage 2 its
    /// synchronised gradients) over the replicas of that part (ZeRO over the mesh's
    /// data-parallel axis).
    pub zero: Option<ZeroStage>,
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

/// Serialised record bytes, or a checkpoint error naming `path`.
pub(super) fn record_bytes(
    path: &Path,
    bytes: std::result::Result<Bytes, burn::store::RecordError>,
) -> Result<Vec<u8>> {
    bytes
        .map(|b| b.to_vec())
        .map_err(|e| TrainError::checkpoint(path, format!("cannot serialise record: {e}")))
}
