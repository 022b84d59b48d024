//! torchvision's ResNet-18/34/50 with torchvision's parameter names, so that `state_dict`s
//! saved by PyTorch (`.pth` or `.safetensors`) load with [`load_weights`](crate::load_weights).

mod block;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

pub use block::{BasicBlock, Bottleneck, Downsample, ResidualBlock};
use block::{conv, norm};

use crate::init::UniformInit;

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResNetDepth {
    /// 18 layers, basic blocks `[2, 2, 2, 2]`.
    R18,
    /// 34 layers, basic blocks `[3, 4, 6, 3]`.
    R34,
    /// 50 layers, bottleneck blocks `[3, 4, 6, 3]`.
    R50,
}

impl ResNetDepth {
    /// The name torchvision gives it (`resnet18`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ResNetDepth::R18 => "resnet18",
            ResNetDepth::R34 => "resnet34",
            ResNetDepth::R50 => "resnet50",
        }
    }

    fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 | ResNetDepth::R50 => [3, 4, 6, 3],
        }
    }

    fn expansion(self) -> usize {
        match self {
            ResNetDepth::R18 | ResNetDepth::R34 => BasicBlock::EXPANSION,
            ResNetDepth::R50 => Bottleneck::EXPANSION,
        }
    }
}

/// A ResNet as torchvision builds it: 7x7 stem, max-pool, four stages of residual blocks,
/// global average pool, fully connected classifier.
#[derive(Module, Debug)]
pub struct ResNet {
    /// 7x7 stride-2 stem convolution.
    pub conv1: Conv2d,
    /// After the stem.
    pub bn1: BatchNorm,
    /// 64 channels, full resolution after the stem.
    pub layer1: Vec<ResidualBlock>,
    /// 128 channels, half resolution.
    pub layer2: Vec<ResidualBlock>,
    /// 256 channels.
    pub layer3: Vec<ResidualBlock>,
    /// 512 channels.
    pub layer4: Vec<ResidualBlock>,
    /// The classifier.
    pub fc: Linear,
    relu: Relu,
    maxpool: MaxPool2d,
    avgpool: AdaptiveAvgPool2d,
}

impl ResNet {
    /// A freshly initialised `depth` ResNet with `num_classes` outputs on `device` (Burn's
    /// default initialisation; load PyTorch weights with [`load_weights`](crate::load_weights)).
    pub fn new(depth: ResNetDepth, num_classes: usize, device: &Device) -> Self {
        let mut inputs = 64;
        let mut stage = |planes: usize, count: usize, stride: usize| -> Vec<ResidualBlock> {
            (0..count)
                .map(|i| {
                    let s = if i == 0 { stride } else { 1 };
                    let block = match depth {
                        ResNetDepth::R18 | ResNetDepth::R34 => {
                            ResidualBlock::Basic(BasicBlock::new(inputs, planes, s, device))
                        }
                        ResNetDepth::R50 => {
                            ResidualBlock::Bottleneck(Bottleneck::new(inputs, planes, s, device))
                        }
                    };
                    inputs = planes * depth.expansion();
                    block
                })
                .collect()
        };
        let [b1, b2, b3, b4] = depth.blocks();
        let layer1 = stage(64, b1, 1);
        let layer2 = stage(128, b2, 2);
        let layer3 = stage(256, b3, 2);
        let layer4 = stage(512, b4, 2);
        Self {
            conv1: conv(3, 64, 7, 2, device),
            bn1: norm(64, device),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new(512 * depth.expansion(), num_classes).init(device),
            relu: Relu::new(),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
        }
    }

    /// The depth a name like `resnet18` stands for.
    pub fn depth_from_name(name: &str) -> Option<ResNetDepth> {
        [ResNetDepth::R18, ResNetDepth::R34, ResNetDepth::R50]
            .into_iter()
            .find(|d| d.name() == name)
    }

    /// Replaces the classifier head `fc` with a new one for `num_classes` outputs, initialised
    /// as PyTorch's `nn.Linear` (`U(-1/sqrt(in), 1/sqrt(in))`) from `seed`: torchvision
    /// fine-tuning's `model.fc = nn.Linear(model.fc.in_features, num_classes)`.
    pub fn with_new_head(mut self, num_classes: usize, seed: u64) -> Self {
        let device = self.fc.weight.val().device();
        let [features, _] = self.fc.weight.val().dims();
        let mut init = UniformInit::new(seed);
        let mut fc = LinearConfig::new(features, num_classes).init(&device);
        fc.weight = init.param([features, num_classes], features, &device);
        fc.bias = Some(init.param([num_classes], features, &device));
        self.fc = fc;
        self
    }

    /// Freezes everything but the head `fc`: no gradients (so no optimizer state) for the
    /// backbone's parameters, and its BatchNorm layers normalise with their running statistics
    /// and stop updating them.
    pub fn freeze_backbone(self) -> Self {
        let freeze = |blocks: Vec<ResidualBlock>| -> Vec<ResidualBlock> {
            blocks.into_iter().map(Module::freeze).collect()
        };
        Self {
            conv1: self.conv1.freeze(),
            bn1: self.bn1.freeze(),
            layer1: freeze(self.layer1),
            layer2: freeze(self.layer2),
            layer3: freeze(self.layer3),
            layer4: freeze(self.layer4),
            ..self
        }
    }

    /// Logits `[batch, num_classes]` for images `[batch, 3, height, width]` (normalised as
    /// torchvision's models expect; any size from 32x32 up).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = stem(&self.conv1, &self.bn1, &self.maxpool, &self.relu, images);
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward(x);
        }
        let x = self.avgpool.forward(x).flatten::<2>(1, 3);
        self.fc.forward(x)
    }
}

/// The stem: `maxpool(relu(bn1(conv1(x))))`. In training on Flex the ReLU runs inside the batch
/// norm's pass (kiln's kernels: no pass of its own); otherwise it is computed as
/// `relu(maxpool(...))`: max-pool and ReLU commute (gradients included: ReLU's is zero wherever
/// the two orders pick different inputs), and the pooled map is a quarter of the size.
fn stem(
    conv1: &Conv2d,
    bn1: &BatchNorm,
    maxpool: &MaxPool2d,
    relu: &Relu,
    x: Tensor<4>,
) -> Tensor<4> {
    if x.device().is_autodiff() {
        let y = kiln_kernels::conv2d(conv1, x);
        if kiln_kernels::batch_norm_uses_kernels(bn1, &y) {
            let y = kiln_kernels::batch_norm_act(bn1, y, None, true);
            return kiln_kernels::max_pool2d(maxpool, y);
        }
        let y = kiln_kernels::batch_norm(bn1, y);
        return relu.forward(kiln_kernels::max_pool2d(maxpool, y));
    }
    let x = block::conv_bn(conv1, bn1, x);
    relu.forward(kiln_kernels::max_pool2d(maxpool, x))
}

/// The first half of a ResNet for a 2-stage pipeline: stem, `layer1`, `layer2`.
#[derive(Module, Debug)]
pub struct ResNetFront {
    /// Stem convolution.
    pub conv1: Conv2d,
    /// Stem batch norm.
    pub bn1: BatchNorm,
    /// First stage.
    pub layer1: Vec<ResidualBlock>,
    /// Second stage.
    pub layer2: Vec<ResidualBlock>,
    relu: Relu,
    maxpool: MaxPool2d,
}

impl ResNetFront {
    /// Feature maps after `layer2`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let x = stem(&self.conv1, &self.bn1, &self.maxpool, &self.relu, images);
        self.layer1
            .iter()
            .chain(&self.layer2)
            .fold(x, |x, b| b.forward(x))
    }
}

/// The second half of a ResNet for a 2-stage pipeline: `layer3`, `layer4`, pool, `fc`.
#[derive(Module, Debug)]
pub struct ResNetBack {
    /// Third stage.
    pub layer3: Vec<ResidualBlock>,
    /// Fourth stage.
    pub layer4: Vec<ResidualBlock>,
    /// The classifier.
    pub fc: Linear,
    avgpool: AdaptiveAvgPool2d,
}

impl ResNetBack {
    /// Logits from the feature maps of `layer2`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self
            .layer3
            .iter()
            .chain(&self.layer4)
            .fold(x, |x, b| b.forward(x));
        self.fc.forward(self.avgpool.forward(x).flatten::<2>(1, 3))
    }
}

impl ResNet {
    /// The model cut after `layer2` into two modules that share its parameters (the two
    /// halves do about the same work), for a 2-stage pipeline.
    pub fn halves(&self) -> (ResNetFront, ResNetBack) {
        let front = ResNetFront {
            conv1: self.conv1.clone(),
            bn1: self.bn1.clone(),
            layer1: self.layer1.clone(),
            layer2: self.layer2.clone(),
            relu: self.relu.clone(),
            maxpool: self.maxpool.clone(),
        };
        let back = ResNetBack {
            layer3: self.layer3.clone(),
            layer4: self.layer4.clone(),
            fc: self.fc.clone(),
            avgpool: self.avgpool.clone(),
        };
        (front, back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_compose_to_the_whole_model() {
        let device = Device::flex();
        let model = ResNet::new(ResNetDepth::R18, 10, &device).valid();
        let x = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        let (front, back) = model.halves();
        let whole = model.forward(x.clone()).into_data();
        let split = back.forward(front.forward(x)).into_data();
        whole.assert_approx_eq::<f32>(&split, burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        struct Trainable(usize);
        impl burn::module::ModuleVisitor for Trainable {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                if param.is_require_grad() {
                    self.0 += param.lazy_shape().num_elements();
                }
            }
        }
        // torchvision: sum(p.numel() for p in resnetXX().parameters()); running statistics
        // are buffers, not parameters.
        let device = Device::flex().autodiff();
        for (depth, expected) in [
            (ResNetDepth::R18, 11_689_512),
            (ResNetDepth::R34, 21_797_672),
            (ResNetDepth::R50, 25_557_032),
        ] {
            let model = ResNet::new(depth, 1000, &device);
            let mut count = Trainable(0);
            model.visit(&mut count);
            assert_eq!(count.0, expected, "{}", depth.name());
        }
    }
}
