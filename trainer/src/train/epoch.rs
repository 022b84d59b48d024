//! The one epoch loop of the workspace.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use kiln_multi::{DistributedDataParallel, ZeroOptimizer};

use crate::data::{ImageBatch, ImageDataset, make_training_batch};
use crate::error::Result;
use crate::report::Progress;

/// What one training epoch measured.
pub(crate) struct EpochOutcome {
    /// Mean loss of this rank's batches.
    pub(crate) mean_loss: f64,
    pub(crate) steps: u64,
    /// Samples this rank trained on.
    pub(crate) samples: usize,
    pub(crate) seconds: f64,
}

/// Everything one epoch needs besides the model and optimizer it updates.
pub(crate) struct EpochInputs<'a> {
    pub(crate) data: &'a dyn ImageDataset,
    pub(crate) order: &'a [usize],
    /// Samples per batch on this rank.
    pub(crate) batch_size: usize,
    pub(crate) lr: f64,
    pub(crate) device: &'a Device,
    /// The epoch (from 0), which seeds the data set's augmentation.
    pub(crate) epoch: usize,
}

/// How a step's loss and gradients are computed: on one device, or through a pipeline.
pub(crate) type LossAndGrads<'a, M> =
    dyn FnMut(&M, ImageBatch) -> Result<(f64, GradientsParams)> + 'a;

/// How a rank turns its gradients into the next parameters.
pub(crate) enum Updater<'a> {
    /// Every rank holds the whole optimizer state; with `ddp`, gradients are first averaged
    /// with the other ranks'.
    Replicated {
        optimizer: &'a mut ModuleOptimizer,
        ddp: Option<&'a mut DistributedDataParallel>,
    },
    /// The optimizer state is split over the ranks (ZeRO).
    Sharded(&'a mut ZeroOptimizer),
}

impl Updater<'_> {
    fn world(&self) -> usize {
        match self {
            Updater::Replicated { ddp: None, .. } => 1,
            Updater::Replicated { ddp: Some(ddp), .. } => ddp.collective().world_size().get(),
            Updater::Sharded(zero) => zero.collective().world_size().get(),
        }
    }

    fn step<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams) -> Result<M> {
        Ok(match self {
            Updater::Replicated { optimizer, ddp } => {
                let grads = match ddp {
                    Some(ddp) => ddp.sync(&model, grads)?,
                    None => grads,
                };
                optimizer.step(lr, model, grads)
            }
            Updater::Sharded(zero) => zero.step(lr, model, grads)?,
        })
    }
}

/// Runs one pass over `inputs.order` in batches, one optimizer step per batch, with the loss
/// and gradients from `loss_and_grads`, through `updater`; the progress bar shows this rank's
/// loss and the throughput of all ranks together.
pub(crate) fn train_epoch<M: Module>(
    mut model: M,
    loss_and_grads: &mut LossAndGrads<'_, M>,
    mut updater: Updater<'_>,
    inputs: EpochInputs<'_>,
    progress: &Progress,
) -> Result<(M, EpochOutcome)> {
    let world = updater.world();
    let start = Instant::now();
    let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0u64, 0usize);
    for chunk in inputs.order.chunks(inputs.batch_size) {
        let batch = make_training_batch(inputs.data, chunk, inputs.epoch, inputs.device);
        let (loss_value, grads) = loss_and_grads(&model, batch)?;
        model = updater.step(inputs.lr, model, grads)?;
        loss_sum += loss_value;
        steps += 1;
        samples += chunk.len();
        progress.batch_done(
            loss_value,
            (samples * world) as f64 / start.elapsed().as_secs_f64().max(1e-9),
        );
    }
    let outcome = EpochOutcome {
        mean_loss: loss_sum / steps.max(1) as f64,
        steps,
        samples,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((model, outcome))
}
