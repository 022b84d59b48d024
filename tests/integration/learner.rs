//! burn-train's `Learner` with kiln's strategy (`KilnDataParallel`): a burn-train program
//! whose only change is its strategy line trains data parallel, taking the steps of
//! burn-train's own single-device run on the ranks' batches concatenated.

use std::sync::Arc;
use std::time::Duration;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::tensor::Device;
use burn_train::{Learner, SupervisedTraining, TrainingStrategy};
use kiln::learner::KilnDataParallel;
use kiln::multi::data_parallel::flatten_params;
use kiln::multi::{Collective, CollectiveConfig, WorldSize, run_in_process};

use crate::common::max_abs_diff;
use crate::general::NoReduce;
use crate::general::own_model::{Forecaster, Window, WindowBatcher, waves};

/// 64 training windows: 32 per rank, batches of 4 per rank (8 on one device), 2 batches per
/// optimizer step (burn-train's gradient accumulation), 2 epochs: 8 optimizer steps.
const ITEMS: usize = 64;
const RANK_BATCH: usize = 4;

fn items() -> Vec<Window> {
    let data = waves(ITEMS, 21);
    (0..ITEMS)
        .map(|i| burn::data::dataset::Dataset::get(&data, i).unwrap())
        .collect()
}

/// The items in the order one device sees the ranks' batches: batch k of rank 0, then batch
/// k of rank 1, for every k.
fn concatenated(items: &[Window]) -> Vec<Window> {
    let (rank0, rank1) = items.split_at(ITEMS / 2);
    rank0
        .chunks(RANK_BATCH)
        .zip(rank1.chunks(RANK_BATCH))
        .flat_map(|(a, b)| a.iter().chain(b).cloned())
        .collect()
}

/// Trains `model` with burn-train for 2 epochs on `items` in batches of `batch`: its final
/// parameters.
fn train(
    model: Forecaster,
    items: Vec<Window>,
    batch: usize,
    strategy: Option<TrainingStrategy<Forecaster>>,
) -> Vec<f32> {
    train_for(model, items, batch, strategy, (2, None))
}

/// burn-train's early stopping: stop after the first epoch.
#[derive(Clone)]
struct StopAfterFirstEpoch;

impl burn_train::EarlyStoppingStrategy for StopAfterFirstEpoch {
    fn should_stop(
        &mut self,
        epoch: usize,
        _: &burn_train::metric::store::EventStoreClient,
    ) -> bool {
        epoch >= 1
    }
}

/// [`train`] for `epochs`, with an early stopping strategy.
fn train_for(
    model: Forecaster,
    items: Vec<Window>,
    batch: usize,
    strategy: Option<TrainingStrategy<Forecaster>>,
    (epochs, early): (usize, Option<StopAfterFirstEpoch>),
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let train = DataLoaderBuilder::new(WindowBatcher)
        .batch_size(batch)
        .build(InMemDataset::new(items));
    let valid = DataLoaderBuilder::new(WindowBatcher)
        .batch_size(16)
        .build(waves(16, 22));
    let learner = Learner::new(
        model,
        AdamWConfig::new().with_weight_decay(0.05).init(),
        ConstantLr::new(1e-2),
    );
    let mut training = SupervisedTraining::new(dir.path(), train, valid)
        .num_epochs(epochs)
        .grads_accumulation(2)
        .with_application_logger(None);
    if let Some(early) = early {
        training = training.early_stopping(early);
    }
    if let Some(strategy) = strategy {
        training = training.with_training_strategy(strategy);
    }
    let result = training.launch(learner);
    assert!(result.error.is_none(), "{:?}", result.error);
    flatten_params(&result.model).unwrap()
}

fn model() -> Forecaster {
    Forecaster::new(16, &Device::flex().autodiff())
}

#[test]
fn two_ranks_take_the_single_device_steps_on_the_concatenated_batches() {
    let (model, items) = (model(), items());
    let single = train(model.clone(), concatenated(&items), 2 * RANK_BATCH, None);
    let strategy = KilnDataParallel::threads(WorldSize::new(2).unwrap(), Device::flex());
    let ranks = train(
        model.clone(),
        items.clone(),
        RANK_BATCH,
        Some(strategy.into()),
    );
    let diff = max_abs_diff(&ranks, &single);
    // Training moved the parameters (so the agreement is not that of two untouched models).
    let moved = max_abs_diff(&single, &flatten_params(&model).unwrap());
    assert!(
        moved > 1e-2,
        "training moved the parameters by only {moved}"
    );
    assert!(diff <= 1e-5, "2 ranks differ from one device by {diff}");
    // The negative control: ranks whose collectives do not reduce train apart.
    let unsynced = run_in_process(
        WorldSize::new(2).unwrap(),
        CollectiveConfig {
            timeout: Duration::from_secs(60),
        },
        |collective| {
            let collective: Arc<dyn Collective> = Arc::new(NoReduce(collective));
            let strategy = KilnDataParallel::process(collective, Device::flex());
            Ok::<_, kiln::multi::MultiError>(train(
                model.clone(),
                items.clone(),
                RANK_BATCH,
                Some(strategy.into()),
            ))
        },
    )
    .unwrap();
    let diff = max_abs_diff(&unsynced[0], &single);
    assert!(diff > 1e-3, "without reduction only {diff} apart");
}

/// A collective whose rank 1 fails its first all-reduce after the start (the gradients'):
/// a broken link, say.
struct FailingRankOne(Arc<dyn Collective>, std::sync::atomic::AtomicUsize);

impl Collective for FailingRankOne {
    fn rank(&self) -> kiln::multi::Rank {
        self.0.rank()
    }
    fn world_size(&self) -> WorldSize {
        self.0.world_size()
    }
    fn all_reduce(&self, buf: &mut [f32], op: kiln::multi::ReduceOp) -> kiln::multi::Result<()> {
        let calls = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.rank().index() == 1 && calls >= 1 {
            return Err(kiln::multi::MultiError::Tensor {
                context: "test".into(),
                detail: "rank 1's link is down".into(),
            });
        }
        self.0.all_reduce(buf, op)
    }
    fn broadcast(&self, buf: &mut [f32], root: kiln::multi::Rank) -> kiln::multi::Result<()> {
        self.0.broadcast(buf, root)
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> kiln::multi::Result<()> {
        self.0.all_gather(shard, out)
    }
    fn reduce_scatter(
        &self,
        buf: &[f32],
        shard: &mut [f32],
        op: kiln::multi::ReduceOp,
    ) -> kiln::multi::Result<()> {
        self.0.reduce_scatter(buf, shard, op)
    }
    fn barrier(&self) -> kiln::multi::Result<()> {
        self.0.barrier()
    }
}

/// A failing rank stops training on every rank with burn-train's error naming it, instead of
/// a hang or a panic: rank 1 reports its own failure, rank 0 the exchange that timed out.
#[test]
fn a_failing_rank_ends_training_with_an_error_on_every_rank() {
    let (model, items) = (model(), items());
    let config = CollectiveConfig {
        timeout: Duration::from_secs(2),
    };
    let errors = run_in_process(WorldSize::new(2).unwrap(), config, |collective| {
        let rank = collective.rank().index();
        let failing: Arc<dyn Collective> = Arc::new(FailingRankOne(collective, 0.into()));
        let strategy = KilnDataParallel::process(failing, Device::flex());
        let dir = tempfile::tempdir().unwrap();
        let train = DataLoaderBuilder::new(WindowBatcher)
            .batch_size(RANK_BATCH)
            .build(InMemDataset::new(items.clone()));
        let valid = DataLoaderBuilder::new(WindowBatcher)
            .batch_size(16)
            .build(waves(16, 22));
        let learner = Learner::new(
            model.clone(),
            AdamWConfig::new().init(),
            ConstantLr::new(1e-2),
        );
        let result = SupervisedTraining::new(dir.path(), train, valid)
            .with_training_strategy(strategy.into())
            .with_application_logger(None)
            .launch(learner);
        let error = result.error.map(|e| e.to_string()).unwrap_or_default();
        Ok::<_, kiln::multi::MultiError>((rank, error))
    })
    .unwrap();
    for (rank, error) in errors {
        assert!(
            error.contains(&format!("training worker on device {rank} failed")),
            "rank {rank}: {error:?}"
        );
    }
}

/// burn-train's early stopping, decided on rank 0 after validation, stops every rank
/// together: 3 epochs asked, stopped after the first, the same as 1 epoch.
#[test]
fn early_stopping_stops_every_rank_together() {
    let (model, items) = (model(), items());
    let strategy = || KilnDataParallel::threads(WorldSize::new(2).unwrap(), Device::flex()).into();
    let one_epoch = train_for(
        model.clone(),
        items.clone(),
        RANK_BATCH,
        Some(strategy()),
        (1, None),
    );
    let stopped = train_for(
        model.clone(),
        items.clone(),
        RANK_BATCH,
        Some(strategy()),
        (3, Some(StopAfterFirstEpoch)),
    );
    assert_eq!(stopped, one_epoch);
    let three = train_for(model, items, RANK_BATCH, Some(strategy()), (3, None));
    assert_ne!(three, one_epoch, "without early stopping the run goes on");
}
