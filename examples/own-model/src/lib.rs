//! A forecaster of noisy wave sequences: the model, data and steps of a kiln user's own
//! project. Nothing here is an image or a class: the model reads 16 values of a sequence and
//! predicts the next one, and the loss is the mean squared error.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use burn_train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};
use kiln::trainer::{Metric, StepOutput, StepResult};

pub mod learner;

/// Values the model reads.
pub const WINDOW: usize = 16;

/// A two-layer forecaster: 16 values in, one out.
#[derive(Module, Debug)]
pub struct Forecaster {
    input: Linear,
    norm: LayerNorm,
    activation: Gelu,
    output: Linear,
}

impl Forecaster {
    /// A forecaster with `hidden` features, on `device`.
    pub fn new(hidden: usize, device: &Device) -> Self {
        Self {
            input: LinearConfig::new(WINDOW, hidden).init(device),
            norm: LayerNormConfig::new(hidden).init(device),
            activation: Gelu::new(),
            output: LinearConfig::new(hidden, 1).init(device),
        }
    }

    /// Predictions `[batch, 1]` for windows `[batch, WINDOW]`.
    pub fn forward(&self, windows: Tensor<2>) -> Tensor<2> {
        let hidden = self
            .activation
            .forward(self.norm.forward(self.input.forward(windows)));
        self.output.forward(hidden)
    }

    /// kiln's training step: mean squared error, and the mean absolute error as a metric.
    pub fn kiln_step(&self, batch: WindowBatch) -> StepResult<StepOutput> {
        let n = batch.targets.dims()[0];
        let error = self.forward(batch.windows) - batch.targets;
        let absolute = error.clone().abs().sum().into_scalar::<f64>();
        let loss = error.powi_scalar(2).mean();
        Ok(StepOutput::new(loss, n).with_metric(Metric::mean("mae", absolute, n as f64)))
    }
}

/// burn-train's training step: the same loss, with burn-train's regression output.
impl TrainStep for Forecaster {
    type Input = WindowBatch;
    type Output = RegressionOutput;

    fn step(&self, batch: WindowBatch) -> TrainOutput<RegressionOutput> {
        let output = InferenceStep::step(self, batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

/// burn-train's evaluation step.
impl InferenceStep for Forecaster {
    type Input = WindowBatch;
    type Output = RegressionOutput;

    fn step(&self, batch: WindowBatch) -> RegressionOutput {
        let predictions = self.forward(batch.windows);
        let loss = (predictions.clone() - batch.targets.clone())
            .powi_scalar(2)
            .mean();
        RegressionOutput::new(loss, predictions, batch.targets)
    }
}

/// One training example: a window of a sequence and the value after it.
#[derive(Debug, Clone)]
pub struct Window {
    /// The values the model reads.
    pub values: [f32; WINDOW],
    /// The next value.
    pub next: f32,
}

/// A batch of windows on a device.
#[derive(Debug, Clone)]
pub struct WindowBatch {
    /// `[batch, WINDOW]`.
    pub windows: Tensor<2>,
    /// `[batch, 1]`.
    pub targets: Tensor<2>,
}

/// Burn's batcher for [`Window`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowBatcher;

impl Batcher<Window, WindowBatch> for WindowBatcher {
    fn batch(&self, items: Vec<Window>, device: &Device) -> WindowBatch {
        let n = items.len();
        let values: Vec<f32> = items.iter().flat_map(|w| w.values).collect();
        let next: Vec<f32> = items.iter().map(|w| w.next).collect();
        WindowBatch {
            windows: Tensor::from_data(TensorData::new(values, [n, WINDOW]), device),
            targets: Tensor::from_data(TensorData::new(next, [n, 1]), device),
        }
    }
}

/// `count` windows of noisy two-tone waves, each of its own frequencies and phases, drawn
/// from `seed` (the same seed gives the same data everywhere).
pub fn waves(count: usize, seed: u64) -> InMemDataset<Window> {
    let mut random = SplitMix(seed);
    let items = (0..count)
        .map(|_| {
            let (f1, f2) = (0.1 + 0.4 * random.unit(), 0.5 + random.unit());
            let (p1, p2) = (6.3 * random.unit(), 6.3 * random.unit());
            let value = |t: usize| {
                let t = t as f64;
                ((f1 * t + p1).sin() + 0.5 * (f2 * t + p2).sin()) as f32
            };
            let mut values = [0.0; WINDOW];
            for (t, v) in values.iter_mut().enumerate() {
                *v = value(t) + 0.05 * (random.unit() as f32 - 0.5);
            }
            Window {
                values,
                next: value(WINDOW),
            }
        })
        .collect();
    InMemDataset::new(items)
}

/// SplitMix64: a small seeded generator, so the data needs no dependency.
struct SplitMix(u64);

impl SplitMix {
    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}
