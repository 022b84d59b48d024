//! SimpleCNN, the MNIST network of PyTorch's tutorials:
//! conv 1->32 3x3 pad 1, ReLU, max-pool 2; conv 32->64 3x3 pad 1, ReLU, max-pool 2;
//! fc 3136->128, ReLU; fc 128->10.
//!
//! Parameter names are PyTorch's (`conv1`, `conv2`, `fc1`, `fc2`), so the `state_dict` of
//! ```python
//! class SimpleCNN(nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
//!         self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
//!         self.fc1 = nn.Linear(64 * 7 * 7, 128)
//!         self.fc2 = nn.Linear(128, 10)
//! ```
//! loads with [`crate::load_weights`].

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

use crate::init::UniformInit;

/// Height and width of the images SimpleCNN takes (MNIST's 28x28).
const IMAGE_SIDE: usize = 28;
/// Channels out of the second convolution.
const CONV2_CHANNELS: usize = 64;
/// Features entering `fc1`: 64 channels of 7x7 after two 2x2 poolings.
const FLAT_FEATURES: usize = CONV2_CHANNELS * (IMAGE_SIDE / 4) * (IMAGE_SIDE / 4);

/// Configuration of [`SimpleCnn`].
#[derive(Config, Debug)]
pub struct SimpleCnnConfig {
    /// Number of output classes (the width of `fc2`).
    #[config(default = 10)]
    pub num_classes: usize,
    /// Width of the hidden fully connected layer.
    #[config(default = 128)]
    pub hidden: usize,
}

/// The SimpleCNN model; see the module documentation for its layers.
#[derive(Module, Debug)]
pub struct SimpleCnn {
    /// First convolution, 1 -> 32 channels.
    pub conv1: Conv2d,
    /// Second convolution, 32 -> 64 channels.
    pub conv2: Conv2d,
    /// Hidden fully connected layer, 3136 -> 128.
    pub fc1: Linear,
    /// Classifier, 128 -> `num_classes`.
    pub fc2: Linear,
    pool: MaxPool2d,
    activation: Relu,
}

impl SimpleCnnConfig {
    /// Builds the model on `device` with PyTorch's default initialisation, drawn from `seed`.
    pub fn init(&self, device: &Device, seed: u64) -> SimpleCnn {
        let mut init = UniformInit::new(seed);
        let padding = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let mut conv1 = Conv2dConfig::new([1, 32], [3, 3])
            .with_padding(padding.clone())
            .init(device);
        conv1.weight = init.param([32, 1, 3, 3], 9, device);
        conv1.bias = Some(init.param([32], 9, device));
        let mut conv2 = Conv2dConfig::new([32, CONV2_CHANNELS], [3, 3])
            .with_padding(padding)
            .init(device);
        conv2.weight = init.param([CONV2_CHANNELS, 32, 3, 3], 32 * 9, device);
        conv2.bias = Some(init.param([CONV2_CHANNELS], 32 * 9, device));
        // Burn stores linear weights as [in, out], the transpose of PyTorch's [out, in].
        let mut fc1 = LinearConfig::new(FLAT_FEATURES, self.hidden).init(device);
        fc1.weight = init.param([FLAT_FEATURES, self.hidden], FLAT_FEATURES, device);
        fc1.bias = Some(init.param([self.hidden], FLAT_FEATURES, device));
        let mut fc2 = LinearConfig::new(self.hidden, self.num_classes).init(device);
        fc2.weight = init.param([self.hidden, self.num_classes], self.hidden, device);
        fc2.bias = Some(init.param([self.num_classes], self.hidden, device));
        SimpleCnn::from_layers(conv1, conv2, fc1, fc2)
    }
}

impl SimpleCnn {
    /// Logits `[batch, num_classes]` for images `[batch, 1, 28, 28]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = conv_block(&self.conv1, &self.pool, &self.activation, images);
        let x = conv_block(&self.conv2, &self.pool, &self.activation, x);
        classify(&self.fc1, &self.fc2, &self.activation, x)
    }

    /// The model made of these layers (e.g. layers gathered back from a tensor-parallel
    /// split), with SimpleCNN's ReLU and 2x2 max-pool.
    pub fn from_layers(conv1: Conv2d, conv2: Conv2d, fc1: Linear, fc2: Linear) -> SimpleCnn {
        SimpleCnn {
            conv1,
            conv2,
            fc1,
            fc2,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            activation: Relu::new(),
        }
    }

    /// The input shape the model expects, without the batch dimension.
    pub fn input_shape() -> [usize; 3] {
        [1, IMAGE_SIDE, IMAGE_SIDE]
    }

    /// The two convolution blocks (convolution, ReLU, max-pool) as modules of their own,
    /// sharing this model's parameters: the first stages of a pipeline.
    pub fn conv_blocks(&self) -> (SimpleCnnConvBlock, SimpleCnnConvBlock) {
        let block = |conv: &Conv2d| SimpleCnnConvBlock {
            conv: conv.clone(),
            pool: self.pool.clone(),
            activation: self.activation.clone(),
        };
        (block(&self.conv1), block(&self.conv2))
    }

    /// The classifier (flatten, fc1, ReLU, fc2) as a module of its own, sharing this model's
    /// parameters: the last stage of a pipeline.
    pub fn classifier(&self) -> SimpleCnnClassifier {
        SimpleCnnClassifier {
            fc1: self.fc1.clone(),
            fc2: self.fc2.clone(),
            activation: self.activation.clone(),
        }
    }
}

/// One convolution block of SimpleCNN: convolution, ReLU, 2x2 max-pool.
#[derive(Module, Debug)]
pub struct SimpleCnnConvBlock {
    /// The convolution (`conv1` or `conv2` of the model).
    pub conv: Conv2d,
    pool: MaxPool2d,
    activation: Relu,
}

impl SimpleCnnConvBlock {
    /// Feature maps at half the resolution.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_block(&self.conv, &self.pool, &self.activation, x)
    }
}

/// SimpleCNN from its second convolution block on: the second stage of a 2-stage pipeline
/// (the first being the conv1 block, which balances the work of the two stages best).
#[derive(Module, Debug)]
pub struct SimpleCnnBack {
    /// `conv2`, ReLU, pool.
    pub block: SimpleCnnConvBlock,
    /// Flatten, fc1, ReLU, fc2.
    pub classifier: SimpleCnnClassifier,
}

impl SimpleCnnBack {
    /// Logits for feature maps `[batch, 32, 14, 14]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.classifier.forward(self.block.forward(x))
    }
}

/// SimpleCNN's classifier: flatten, fc1, ReLU, fc2.
#[derive(Module, Debug)]
pub struct SimpleCnnClassifier {
    /// Hidden fully connected layer.
    pub fc1: Linear,
    /// Output layer.
    pub fc2: Linear,
    activation: Relu,
}

impl SimpleCnnClassifier {
    /// Logits for feature maps `[batch, 64, 7, 7]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        classify(&self.fc1, &self.fc2, &self.activation, x)
    }
}

/// Convolution, ReLU, max-pool. ReLU runs after the pool: max-pool and ReLU commute (both are
/// monotone, and ReLU's gradient is zero wherever the two orders pick different inputs), so the
/// result and its gradients are those of PyTorch's `pool(relu(conv(x)))` at a quarter of the
/// ReLU work. The convolution and pool go through kiln's CPU kernels where they apply.
fn conv_block(conv: &Conv2d, pool: &MaxPool2d, activation: &Relu, x: Tensor<4>) -> Tensor<4> {
    activation.forward(kiln_kernels::max_pool2d(
        pool,
        kiln_kernels::conv2d(conv, x),
    ))
}

fn classify(fc1: &Linear, fc2: &Linear, activation: &Relu, x: Tensor<4>) -> Tensor<2> {
    let x = x.flatten::<2>(1, 3);
    fc2.forward(activation.forward(fc1.forward(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_identical_parameters_and_other_seed_differs() {
        let device = Device::flex();
        let a = SimpleCnnConfig::new().init(&device, 7);
        let b = SimpleCnnConfig::new().init(&device, 7);
        let c = SimpleCnnConfig::new().init(&device, 8);
        let wa = a.conv2.weight.val().into_data();
        let wb = b.conv2.weight.val().into_data();
        let wc = c.conv2.weight.val().into_data();
        assert_eq!(wa, wb);
        assert_ne!(wa, wc);
    }

    #[test]
    fn forward_shape_and_parameter_count_match_pytorch() {
        let device = Device::flex();
        let model = SimpleCnnConfig::new().init(&device, 1);
        let logits = model.forward(Tensor::zeros([3, 1, 28, 28], &device));
        assert_eq!(logits.dims(), [3, 10]);
        // PyTorch: sum(p.numel() for p in SimpleCNN().parameters()) == 421_642.
        assert_eq!(model.num_params(), 421_642);
    }

    #[test]
    fn initial_values_respect_pytorch_bounds() {
        let device = Device::flex();
        let model = SimpleCnnConfig::new().init(&device, 3);
        let bound = 1.0 / (FLAT_FEATURES as f32).sqrt();
        let values = model
            .fc1
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max <= bound, "max {max} exceeds bound {bound}");
        assert!(max > 0.9 * bound, "max {max} far below bound {bound}");
    }
}
