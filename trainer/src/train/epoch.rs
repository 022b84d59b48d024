//! The one epoch loop of the workspace.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};

use crate::data::{ImageDataset, make_batch};
use crate::report::Progress;

/// What one training epoch measured.
pub(crate) struct EpochOutcome {
    pub(crate) mean_loss: f64,
    pub(crate) steps: u64,
    pub(crate) samples: usize,
    pub(crate) seconds: f64,
}

/// Everything one epoch needs besides the model and optimizer it updates.
pub(crate) struct EpochInputs<'a> {
    pub(crate) data: &'a dyn ImageDataset,
    pub(crate) order: &'a [usize],
    pub(crate) batch_size: usize,
    pub(crate) lr: f64,
    pub(crate) loss_fn: &'a CrossEntropyLoss,
    pub(crate) device: &'a Device,
}

/// Runs one pass over `inputs.order` in batches, one SGD step per batch.
pub(crate) fn train_epoch<M, F>(
    mut model: M,
    forward: &F,
    optimizer: &mut ModuleOptimizer,
    inputs: EpochInputs<'_>,
    progress: &Progress,
) -> (M, EpochOutcome)
where
    M: Module,
    F: Fn(&M, Tensor<4>) -> Tensor<2>,
{
    let start = Instant::now();
    let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0u64, 0usize);
    for chunk in inputs.order.chunks(inputs.batch_size) {
        let batch = make_batch(inputs.data, chunk, inputs.device);
        let logits = forward(&model, batch.images);
        let loss = inputs.loss_fn.forward(logits, batch.targets);
        let loss_value = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(inputs.lr, model, grads);
        loss_sum += loss_value;
        steps += 1;
        samples += chunk.len();
        progress.batch_done(
            loss_value,
            samples as f64 / start.elapsed().as_secs_f64().max(1e-9),
        );
    }
    let outcome = EpochOutcome {
        mean_loss: loss_sum / steps.max(1) as f64,
        steps,
        samples,
        seconds: start.elapsed().as_secs_f64(),
    };
    (model, outcome)
}
