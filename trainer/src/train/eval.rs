use std::num::NonZeroUsize;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor};

use crate::data::{ImageDataset, make_batch};

/// Loss and accuracy of a model on a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalMetrics {
    /// Mean cross-entropy over all samples.
    pub loss: f64,
    /// Fraction of samples whose arg-max logit is the label.
    pub accuracy: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Samples per second of the evaluation itself.
    pub samples_per_sec: f64,
}

/// Evaluates `model` (in validation mode, without autodiff) on all of `data`, in order, in
/// batches of `batch_size`.
pub fn evaluate<M, F>(
    model: &M,
    forward: F,
    data: &dyn ImageDataset,
    batch_size: NonZeroUsize,
    device: &Device,
) -> EvalMetrics
where
    M: Module,
    F: Fn(&M, Tensor<4>) -> Tensor<2>,
{
    let indices: Vec<usize> = (0..data.len()).collect();
    let start = Instant::now();
    let sums = evaluate_indices(model, forward, data, &indices, batch_size, device);
    sums.metrics(start.elapsed().as_secs_f64())
}

/// Totals over some samples, which ranks evaluating disjoint shards add up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EvalSums {
    pub(crate) loss_sum: f64,
    pub(crate) correct: f64,
    pub(crate) samples: f64,
}

impl EvalSums {
    pub(crate) fn metrics(self, seconds: f64) -> EvalMetrics {
        let n = self.samples.max(1.0);
        EvalMetrics {
            loss: self.loss_sum / n,
            accuracy: self.correct / n,
            samples: self.samples as usize,
            samples_per_sec: self.samples / seconds.max(1e-9),
        }
    }
}

/// Loss and correct-prediction totals of `model` on the samples `indices` of `data`.
pub(crate) fn evaluate_indices<M, F>(
    model: &M,
    forward: F,
    data: &dyn ImageDataset,
    indices: &[usize],
    batch_size: NonZeroUsize,
    device: &Device,
) -> EvalSums
where
    M: Module,
    F: Fn(&M, Tensor<4>) -> Tensor<2>,
{
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let (mut loss_sum, mut correct) = (0.0f64, 0i64);
    for chunk in indices.chunks(batch_size.get()) {
        let batch = make_batch(data, chunk, &device);
        let logits = forward(&model, batch.images);
        let loss = loss_fn.forward(logits.clone(), batch.targets.clone());
        loss_sum += loss.into_scalar::<f64>() * chunk.len() as f64;
        correct += count_correct(logits, batch.targets);
    }
    EvalSums {
        loss_sum,
        correct: correct as f64,
        samples: indices.len() as f64,
    }
}

/// Number of rows of `logits` whose arg-max equals the target.
pub(crate) fn count_correct(logits: Tensor<2>, targets: Tensor<1, Int>) -> i64 {
    let [n, _] = logits.dims();
    let predicted = logits.argmax(1).reshape([n]);
    predicted.equal(targets).int().sum().into_scalar::<i64>()
}
