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

    /// Logits `[batch, num_classes]` for images `[batch, 3, height, width]` (normalised as
    /// torchvision's models expect; any size from 32x32 up).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self
            .relu
            .forward(self.bn1.forward(self.conv1.forward(images)));
        let mut x = self.maxpool.forward(x);
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

#[cfg(test)]
mod tests {
    use super::*;

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
