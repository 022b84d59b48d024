//! What a training or evaluation step of any model returns: a loss and the metrics to
//! aggregate, and the ready-made step of a classifier.
//!
//! A step is a function from the model and one batch to a [`StepOutput`]; the trainer runs
//! backward on the loss, synchronises, clips and steps the optimizer, and sums the metrics
//! over batches and ranks. Any closure `Fn(&M, B) -> StepResult<StepOutput>` is a step.

use std::collections::BTreeMap;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor};

/// The error a step may return: any error, boxed (`?` converts most errors into it).
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// What a step returns.
pub type StepResult<T> = std::result::Result<T, StepError>;

/// How a metric's values over batches and ranks combine into the reported number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reduce {
    /// `sum of values / sum of counts`: an accuracy (correct over samples), a mean error.
    Mean,
    /// The sum of the values: a token or sample count.
    Sum,
}

/// One metric of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Name in `metrics.jsonl` and the progress lines.
    pub name: &'static str,
    /// The batch's value (a sum: correct predictions, squared errors, tokens).
    pub value: f64,
    /// What the value is counted over, for [`Reduce::Mean`] (samples, tokens).
    pub count: f64,
    /// How batches and ranks combine.
    pub reduce: Reduce,
}

impl Metric {
    /// A metric reported as `sum of value / sum of count` (e.g. `mean("accuracy", correct,
    /// samples)`).
    pub fn mean(name: &'static str, value: f64, count: f64) -> Self {
        Self {
            name,
            value,
            count,
            reduce: Reduce::Mean,
        }
    }

    /// A metric reported as the sum of its values (e.g. `total("tokens", n)`).
    pub fn total(name: &'static str, value: f64) -> Self {
        Self {
            name,
            value,
            count: 0.0,
            reduce: Reduce::Sum,
        }
    }
}

/// What a step computed on one batch.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The loss to minimise: a one-element tensor, the mean over the batch's `items`.
    pub loss: Tensor<1>,
    /// How many items the loss averages over (samples, tokens); it weights the reported
    /// loss across batches and ranks.
    pub items: usize,
    /// Further metrics to aggregate.
    pub metrics: Vec<Metric>,
}

impl StepOutput {
    /// A loss averaged over `items` items, with no other metric.
    pub fn new(loss: Tensor<1>, items: usize) -> Self {
        Self {
            loss,
            items,
            metrics: Vec::new(),
        }
    }

    /// Adds a metric.
    pub fn with_metric(mut self, metric: Metric) -> Self {
        self.metrics.push(metric);
        self
    }
}

/// What a training step that runs its own backward returns: its loss and metrics (the loss's
/// value is reported; the trainer does not call `backward` on it) and the gradients of the
/// parameters. For models whose backward needs collectives between its parts, as Megatron's
/// tensor parallelism does (an all-reduce of the activation gradient before each split layer).
#[derive(Debug)]
pub struct GradStep {
    /// The loss (its value only) and metrics.
    pub output: StepOutput,
    /// The gradients of the trainable parameters.
    pub grads: burn::optim::GradientsParams,
}

/// The ready-made step of a classifier: cross-entropy of `logits` `[batch, classes]` against
/// class `targets` `[batch]`, and the accuracy.
pub fn classification_output(logits: Tensor<2>, targets: Tensor<1, Int>) -> StepOutput {
    let [n, _] = logits.dims();
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.clone(), targets.clone());
    let correct = logits
        .argmax(1)
        .reshape([n])
        .equal(targets)
        .int()
        .sum()
        .into_scalar::<i64>();
    StepOutput::new(loss, n).with_metric(Metric::mean("accuracy", correct as f64, n as f64))
}

/// Metrics summed over batches (and, after [`MetricSums::all_reduce`], over ranks); part of
/// a mid-epoch checkpoint, so that a resumed epoch reports what an uninterrupted one does.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MetricSums {
    /// `loss * items` summed, and the items.
    pub(crate) loss: (f64, f64),
    /// Per metric, in first-seen order.
    pub(crate) metrics: Vec<SummedMetric>,
}

/// One metric's sums.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SummedMetric {
    pub(crate) name: String,
    pub(crate) reduce: Reduce,
    pub(crate) value: f64,
    pub(crate) count: f64,
}

impl MetricSums {
    /// Adds one batch's loss value and metrics.
    pub(crate) fn add(&mut self, loss: f64, items: usize, metrics: &[Metric]) {
        self.loss.0 += loss * items as f64;
        self.loss.1 += items as f64;
        for metric in metrics {
            match self.metrics.iter_mut().find(|m| m.name == metric.name) {
                Some(summed) => {
                    summed.value += metric.value;
                    summed.count += metric.count;
                }
                None => self.metrics.push(SummedMetric {
                    name: metric.name.to_string(),
                    reduce: metric.reduce,
                    value: metric.value,
                    count: metric.count,
                }),
            }
        }
    }

    /// The items-weighted mean loss.
    pub(crate) fn mean_loss(&self) -> f64 {
        self.loss.0 / self.loss.1.max(1.0)
    }

    /// Every metric's reported value, by name.
    pub(crate) fn values(&self) -> BTreeMap<String, f64> {
        self.metrics
            .iter()
            .map(|m| {
                let reported = match m.reduce {
                    Reduce::Mean => m.value / m.count.max(f64::MIN_POSITIVE),
                    Reduce::Sum => m.value,
                };
                (m.name.clone(), reported)
            })
            .collect()
    }

    /// The sums in a fixed order, for a sum over ranks.
    pub(crate) fn to_values(&self) -> Vec<f64> {
        let mut values = vec![self.loss.0, self.loss.1];
        for m in &self.metrics {
            values.extend([m.value, m.count]);
        }
        values
    }

    /// Reads back sums written by [`to_values`](Self::to_values) (and summed).
    pub(crate) fn read_values(&mut self, values: &[f64]) {
        let mut values = values.iter().copied();
        let mut next = || values.next().unwrap_or(0.0);
        self.loss = (next(), next());
        for m in &mut self.metrics {
            m.value = next();
            m.count = next();
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    #[test]
    fn classification_output_is_cross_entropy_and_accuracy() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data(
            TensorData::new(vec![2.0f32, 0.0, 0.0, 1.0, 3.0, 0.0], [2, 3]),
            &device,
        );
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2], [2]), &device);
        let out = classification_output(logits, targets);
        // -log softmax: row 0 at class 0, row 1 at class 2.
        let ce = |row: [f64; 3], t: usize| {
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            z.ln() - row[t]
        };
        let expected = (ce([2.0, 0.0, 0.0], 0) + ce([1.0, 3.0, 0.0], 2)) / 2.0;
        let loss = out.loss.into_scalar::<f64>();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        assert_eq!(out.items, 2);
        assert_eq!(out.metrics, [Metric::mean("accuracy", 1.0, 2.0)]);
    }

    #[test]
    fn sums_weight_by_items_and_round_trip_through_values() {
        let mut sums = MetricSums::default();
        sums.add(
            1.0,
            3,
            &[
                Metric::mean("accuracy", 2.0, 3.0),
                Metric::total("tokens", 3.0),
            ],
        );
        sums.add(
            4.0,
            1,
            &[
                Metric::mean("accuracy", 1.0, 1.0),
                Metric::total("tokens", 1e8 + 1.0),
            ],
        );
        assert_eq!(sums.mean_loss(), 7.0 / 4.0);
        let values = sums.values();
        assert_eq!(values["accuracy"], 0.75);
        assert_eq!(values["tokens"], 1e8 + 4.0);
        let mut back = MetricSums {
            loss: (0.0, 0.0),
            ..sums.clone()
        };
        back.read_values(&sums.to_values());
        assert_eq!(back, sums);
    }
}
