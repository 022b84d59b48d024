//! The one epoch loop of the workspace.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use kiln_multi::DistributedDataParallel;

use crate::data::{ImageBatch, ImageDataset, make_batch};
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
}

/// How a step's loss and gradients are computed: on one device, or through a pipeline.
pub(crate) type LossAndGrads<'a, M> =
    dyn FnMut(&M, ImageBatch) -> Result<(f64, GradientsParams)> + 'a;

/// Runs one pass over `inputs.order` in batches, one SGD step per batch, with the loss and
/// gradients from `loss_and_grads`. With `sync`, every step's gradients are first averaged
/// with the other ranks'; the progress bar shows this rank's loss and the throughput of all
/// ranks together.
pub(crate) fn train_epoch<M: Module>(
    mut model: M,
    loss_and_grads: &mut LossAndGrads<'_, M>,
    optimizer: &mut ModuleOptimizer,
    inputs: EpochInputs<'_>,
    mut sync: Option<&mut DistributedDataParallel>,
    progress: &Progress,
) -> Result<(M, EpochOutcome)> {
    let world = sync
        .as_deref()
        .map_or(1, |ddp| ddp.collective().world_size().get());
    let start = Instant::now();
    let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0u64, 0usize);
    for chunk in inputs.order.chunks(inputs.batch_size) {
        let batch = make_batch(inputs.data, chunk, inputs.device);
        let (loss_value, mut grads) = loss_and_grads(&model, batch)?;
        if let Some(ddp) = sync.as_deref_mut() {
            grads = ddp.sync(&model, grads)?;
        }
        model = optimizer.step(inputs.lr, model, grads);
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
