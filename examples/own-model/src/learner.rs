//! The same forecaster through burn-train's `Learner`: a plain burn-train program whose one
//! kiln line is the training strategy.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use burn::data::dataloader::DataLoaderBuilder;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::tensor::Device;
use burn_train::metric::LossMetric;
use burn_train::{InferenceStep, Learner, SupervisedTraining, TrainingStrategy};
use kiln::learner::KilnDataParallel;
use kiln::multi::WorldSize;
use kiln::recipes::distributed::run_as_launched;

use super::{Forecaster, WindowBatcher, waves};

/// Trains for `epochs` on `ranks` threads (or, under `kiln launch`, on the job's processes)
/// and prints the validation loss as JSON; with `plain`, burn-train's own single-device
/// training instead (the same program without kiln's strategy line).
///
/// # Errors
/// A bad rank count, a failed launch, or a training error that burn-train reports.
pub fn run(
    ranks: usize,
    epochs: usize,
    out: &Path,
    plain: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex().autodiff();
    device.seed(42);
    if plain {
        return train(None, epochs, out, &device, 0);
    }
    let ranks = WorldSize::new(ranks)?;
    run_as_launched(Duration::from_secs(60), |group| {
        let strategy = match group {
            Some(collective) => KilnDataParallel::process(Arc::clone(&collective), Device::flex()),
            None => KilnDataParallel::threads(ranks, Device::flex()),
        };
        let rank = strategy.rank();
        train(Some(strategy.into()), epochs, out, &device, rank)
    })
}

fn train(
    strategy: Option<TrainingStrategy<Forecaster>>,
    epochs: usize,
    out: &Path,
    device: &Device,
    rank: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    // From here on, a plain burn-train program: loaders, learner, metrics, launch.
    let train = DataLoaderBuilder::new(WindowBatcher)
        .batch_size(32)
        .shuffle(1)
        .build(waves(4096, 1));
    let valid = DataLoaderBuilder::new(WindowBatcher)
        .batch_size(256)
        .build(waves(512, 2));
    let learner = Learner::new(
        Forecaster::new(32, device),
        AdamWConfig::new().with_weight_decay(0.01).init(),
        ConstantLr::new(3e-3),
    );
    let mut training = SupervisedTraining::new(out, train, valid.clone())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .num_epochs(epochs);
    if let Some(strategy) = strategy {
        training = training.with_training_strategy(strategy); // the one kiln line
    }
    let result = training.launch(learner);
    if let Some(error) = result.error {
        return Err(error.to_string().into());
    }
    if rank != 0 {
        return Ok(());
    }
    let (mut loss, mut batches) = (0.0, 0usize);
    for batch in valid.iter() {
        let output = InferenceStep::step(&result.model, batch?);
        loss += output.loss.into_scalar::<f64>();
        batches += 1;
    }
    println!(
        "{{\"learner\":true,\"test_loss\":{}}}",
        loss / batches.max(1) as f64
    );
    Ok(())
}
