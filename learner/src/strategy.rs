//! [`KilnDataParallel`]: a burn-train `SupervisedLearningStrategy` over kiln's collectives.

use std::sync::{Arc, Mutex, MutexGuard};

use burn::data::dataloader::Progress;
use burn::tensor::Device;
use burn_train::train::WorkerFailure;
use burn_train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearnerModel,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents,
    TrainingError, TrainingItem, TrainingStrategy, ValidLoader,
};
use kiln_multi::{
    BucketConfig, Collective, CollectiveConfig, DistributedDataParallel, ReduceOp, WorldSize,
    run_in_process,
};

/// Data parallelism over kiln's collectives, as a burn-train training strategy: PyTorch's
/// DDP for a burn-train `Learner`.
///
/// The training items are cut into one contiguous slice per rank, each of
/// `items / ranks` items (a remainder of fewer than `ranks` items is left out, so that every
/// rank takes the same number of steps); each rank iterates its slice as the loader would
/// (batches, and the loader's shuffle within the slice). Gradients are averaged over the
/// ranks before every optimizer step (summed over the micro-batches of burn-train's gradient
/// accumulation first, as burn-train does), so the replicas take identical steps. Rank 0
/// validates, reports the end of each split and epoch, and checkpoints; every rank reports
/// its training items to burn-train's metrics; burn-train's early stopping, decided on rank
/// 0, stops every rank.
///
/// A rank that fails, or an exchange that times out, stops the training with burn-train's
/// `TrainingError::Workers` naming the rank, instead of hanging.
#[derive(Clone)]
pub struct KilnDataParallel {
    ranks: Ranks,
    collective: CollectiveConfig,
    buckets: BucketConfig,
}

#[derive(Clone)]
enum Ranks {
    /// One rank per device, as threads of this process.
    Threads(Vec<Device>),
    /// This process is one rank of a group made outside (an MPI job).
    Process {
        device: Device,
        collective: Arc<dyn Collective>,
    },
}

impl KilnDataParallel {
    /// `ranks` ranks as threads of this process, each with a replica on `device` (on the
    /// CPU, the one Flex device; ranks are logical). Autodiff is added to the device.
    pub fn threads(ranks: WorldSize, device: Device) -> Self {
        Self::on_devices(vec![device; ranks.get()])
    }

    /// One rank per device, as threads of this process (GPU `i` for rank `i`, say).
    pub fn on_devices(devices: Vec<Device>) -> Self {
        Self {
            ranks: Ranks::Threads(devices),
            collective: CollectiveConfig::default(),
            buckets: BucketConfig::default(),
        }
    }

    /// This process as one rank of `collective`'s group (e.g. the MPI group of a job started
    /// by `kiln launch`), training on `device`. Every process of the group runs the same
    /// program with the same loaders.
    pub fn process(collective: Arc<dyn Collective>, device: Device) -> Self {
        Self {
            ranks: Ranks::Process { device, collective },
            collective: CollectiveConfig::default(),
            buckets: BucketConfig::default(),
        }
    }

    /// This process's rank: its group's rank for [`process`](Self::process), 0 for threads
    /// (whose results rank 0 returns).
    pub fn rank(&self) -> usize {
        match &self.ranks {
            Ranks::Threads(_) => 0,
            Ranks::Process { collective, .. } => collective.rank().index(),
        }
    }

    /// Sets the timeout of every exchange between the threads (a process group keeps its
    /// own).
    pub fn with_collective(mut self, collective: CollectiveConfig) -> Self {
        self.collective = collective;
        self
    }

    /// Sets the gradient bucket sizes.
    pub fn with_buckets(mut self, buckets: BucketConfig) -> Self {
        self.buckets = buckets;
        self
    }
}

impl<M: LearnerModel> From<KilnDataParallel> for TrainingStrategy<M> {
    fn from(strategy: KilnDataParallel) -> Self {
        TrainingStrategy::Custom(Arc::new(strategy))
    }
}

/// What every rank shares: burn-train's event processor and checkpointer, the loaders.
struct Shared<M: LearnerModel> {
    components: Mutex<TrainingComponents<M>>,
    /// Each rank's slice of the training items, on its device.
    train: Vec<TrainLoader<M>>,
    /// Items per rank.
    per_rank: usize,
    valid: ValidLoader<M>,
    starting_epoch: usize,
}

impl<M: LearnerModel> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, TrainingComponents<M>> {
        self.components
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<M: LearnerModel> SupervisedLearningStrategy<M> for KilnDataParallel {
    fn fit(
        &self,
        training_components: TrainingComponents<M>,
        learner: Learner<M>,
        dataloader_train: TrainLoader<M>,
        dataloader_valid: ValidLoader<M>,
        starting_epoch: usize,
    ) -> (M, SupervisedTrainingEventProcessor<M>) {
        let interrupter = training_components.interrupter.clone();
        let devices = match &self.ranks {
            Ranks::Threads(devices) => devices.clone(),
            Ranks::Process { device, collective } => {
                vec![device.clone(); collective.world_size().get()]
            }
        };
        let (train, per_rank) = rank_slices(&dataloader_train, &devices);
        let shared = Shared {
            components: Mutex::new(training_components),
            train,
            per_rank,
            valid: dataloader_valid,
            starting_epoch,
        };
        let fallback = learner.model();
        let outcome = match &self.ranks {
            Ranks::Threads(devices) => self.threads_fit(devices, learner, &shared),
            Ranks::Process { device, collective } => {
                let rank = collective.rank().index();
                fit_rank(
                    Arc::clone(collective),
                    device,
                    learner,
                    &shared,
                    self.buckets,
                )
                .map_err(|e| (rank, e))
            }
        };
        let model = outcome.unwrap_or_else(|(rank, error)| {
            interrupter.fail(TrainingError::Workers(vec![WorkerFailure {
                device_id: rank,
                message: error.to_string(),
            }]));
            fallback
        });
        let components = shared
            .components
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (model, components.event_processor)
    }
}

impl KilnDataParallel {
    /// Runs every rank on its thread; rank 0's model, or the failed rank and its error.
    fn threads_fit<M: LearnerModel>(
        &self,
        devices: &[Device],
        learner: Learner<M>,
        shared: &Shared<M>,
    ) -> Result<M, (usize, kiln_multi::MultiError)> {
        let world = WorldSize::new(devices.len()).map_err(|e| (0, e))?;
        // A model need not be Sync: each rank takes its replica through the lock.
        let learner = Mutex::new(learner);
        let models = run_in_process(world, self.collective, |collective| {
            let rank = collective.rank().index();
            let replica = learner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            fit_rank(collective, &devices[rank], replica, shared, self.buckets)
        });
        // run_in_process names the rank that broke the group in its error.
        models
            .map(|models| {
                models
                    .into_iter()
                    .next()
                    .expect("a world has at least rank 0")
            })
            .map_err(|e| (0, e))
    }
}

/// Every rank's slice of the training items, on its autodiff device, and the items per
/// slice. Made for all ranks in rank order, in threads and in processes alike: each slice
/// forks the loader's shuffling generator, so the order of the forks decides every rank's
/// shuffle.
fn rank_slices<O>(
    train: &Arc<dyn burn::data::dataloader::DataLoader<O>>,
    devices: &[Device],
) -> (Vec<Arc<dyn burn::data::dataloader::DataLoader<O>>>, usize) {
    let per_rank = train.num_items() / devices.len().max(1);
    let slices = devices
        .iter()
        .enumerate()
        .map(|(rank, device)| {
            train
                .slice(rank * per_rank, (rank + 1) * per_rank)
                .to_device(&autodiff(device))
        })
        .collect();
    (slices, per_rank)
}

fn autodiff(device: &Device) -> Device {
    if device.is_autodiff() {
        device.clone()
    } else {
        device.clone().autodiff()
    }
}

/// The training of one rank: its slice of the items, every step synchronised; rank 0
/// validates, reports and checkpoints.
fn fit_rank<M: LearnerModel>(
    collective: Arc<dyn Collective>,
    device: &Device,
    mut learner: Learner<M>,
    shared: &Shared<M>,
    buckets: BucketConfig,
) -> kiln_multi::Result<M> {
    let device = autodiff(device);
    learner.fork(&device);
    let (model, mut ddp) = DistributedDataParallel::new(learner.model(), collective, buckets)?;
    learner.load_model(model.into_record());
    let (rank, world) = {
        let c = ddp.collective();
        (c.rank().index(), c.world_size().get())
    };
    let (per_rank, train) = (shared.per_rank, &shared.train[rank]);
    let (num_epochs, accumulation, interrupter) = {
        let c = shared.lock();
        (c.num_epochs, c.grad_accumulation, c.interrupter.clone())
    };
    for epoch in shared.starting_epoch..=num_epochs {
        if rank == 0 {
            let mut c = shared.lock();
            let event = LearnerEvent::StartSplit {
                epoch_number: epoch,
                total_items: per_rank * world,
            };
            let result = c.event_processor.process_train(event);
            c.interrupter.fail_on_error(result);
        }
        let mut stopped = train_epoch(&mut learner, &mut ddp, train, shared, accumulation, world)?;
        if rank == 0 {
            stopped |= end_epoch(&learner, &device, shared, epoch);
        }
        // Every rank stops together: whether any rank was stopped, decided by all.
        let mut stop = [f32::from(u8::from(stopped || interrupter.should_stop()))];
        ddp.collective().all_reduce(&mut stop, ReduceOp::Max)?;
        if stop[0] > 0.0 {
            break;
        }
    }
    Ok(learner.model())
}

/// One pass over this rank's slice; whether training was stopped during it.
fn train_epoch<M: LearnerModel>(
    learner: &mut Learner<M>,
    ddp: &mut DistributedDataParallel,
    train: &TrainLoader<M>,
    shared: &Shared<M>,
    accumulation: Option<usize>,
    world: usize,
) -> kiln_multi::Result<bool> {
    let mut iterator = train.iter();
    let (mut iteration, mut pending) = (0usize, 0usize);
    while let Some(item) = iterator.next() {
        let item = match item {
            Ok(item) => item,
            Err(error) => {
                shared.lock().interrupter.fail(error);
                return Ok(true);
            }
        };
        iteration += 1;
        let progress = iterator.progress();
        let output = learner.train_step(item);
        pending += 1;
        let due = accumulation.is_none_or(|k| pending >= k) || progress.is_completed();
        if due {
            let grads = ddp.sync(&learner.model(), output.grads)?;
            learner.lr_step();
            learner.optimizer_step(grads);
            pending = 0;
        } else {
            ddp.accumulate(&learner.model(), output.grads)?;
        }
        let global = Progress {
            items_processed: progress.items_processed * world,
            items_total: progress.items_total * world,
            unit: progress.unit.clone(),
        };
        let event = LearnerEvent::ProcessedItem(TrainingItem::new(
            output.item,
            global,
            Some(iteration * world),
            Some(learner.lr_current()),
        ));
        let mut c = shared.lock();
        let result = c.event_processor.process_train(event);
        c.interrupter.fail_on_error(result);
    }
    Ok(false)
}

/// Rank 0 after a training pass: the end of the split, validation, the end of the epoch, the
/// checkpoint, and burn-train's early stopping; whether that says to stop.
fn end_epoch<M: LearnerModel>(
    learner: &Learner<M>,
    device: &Device,
    shared: &Shared<M>,
    epoch: usize,
) -> bool {
    let mut c = shared.lock();
    let result = c
        .event_processor
        .process_train(LearnerEvent::EndSplit(epoch));
    c.interrupter.fail_on_error(result);
    let valid = shared.valid.to_device(&device.clone().inner());
    let model = learner.model().valid();
    let result = c.event_processor.process_valid(LearnerEvent::StartSplit {
        epoch_number: epoch,
        total_items: valid.num_items(),
    });
    c.interrupter.fail_on_error(result);
    let mut iterator = valid.iter();
    let mut iteration = 0;
    while let Some(item) = iterator.next() {
        let item = match item {
            Ok(item) => item,
            Err(error) => {
                c.interrupter.fail(error);
                break;
            }
        };
        iteration += 1;
        let progress = iterator.progress();
        let output = InferenceStep::step(&model, item);
        let event =
            LearnerEvent::ProcessedItem(TrainingItem::new(output, progress, Some(iteration), None));
        let result = c.event_processor.process_valid(event);
        c.interrupter.fail_on_error(result);
    }
    let result = c
        .event_processor
        .process_valid(LearnerEvent::EndSplit(epoch));
    c.interrupter.fail_on_error(result);
    let result = c
        .event_processor
        .process_train(LearnerEvent::EndEpoch(epoch));
    c.interrupter.fail_on_error(result);
    if c.checkpointer.is_some() || c.early_stopping.is_some() {
        let result = c.event_processor.flush();
        c.interrupter.fail_on_error(result);
    }
    let store = Arc::clone(&c.event_store);
    if let Some(checkpointer) = c.checkpointer.as_mut() {
        checkpointer.checkpoint(learner, epoch, &store);
    }
    c.early_stopping
        .as_mut()
        .is_some_and(|early| early.should_stop(epoch, &store))
}
