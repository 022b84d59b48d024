//! The residual blocks of torchvision's ResNets, with torchvision's parameter names.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

/// A bias-free `k x k` convolution with torchvision's padding (`k / 2`).
pub(crate) fn conv(
    inputs: usize,
    outputs: usize,
    k: usize,
    stride: usize,
    device: &Device,
) -> Conv2d {
    let pad = k / 2;
    Conv2dConfig::new([inputs, outputs], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device)
}

pub(crate) fn norm(features: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(features).init(device)
}

/// `bn(conv(x))`, the convolution through kiln's CPU kernels; see [`conv_bn_act`].
pub(crate) fn conv_bn(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    conv_bn_act(conv, bn, x, None, None)
}

/// `relu(bn(conv(x)) + residual)`, the add and the ReLU each when given, the convolution
/// through kiln's CPU kernels.
///
/// On an autodiff device (training) the batch norm runs through `kiln_kernels::batch_norm_act`:
/// batch statistics in training mode, and on Flex the add and the ReLU inside the batch norm's
/// own pass, forward and backward. Without autodiff (inference), the batch norm uses its
/// running statistics and is folded into the convolution: weights times
/// `s = gamma / sqrt(running_var + eps)` and bias `beta - running_mean * s`, so the activations
/// are written once instead of once more per batch-norm step; the add and the ReLU follow.
pub(crate) fn conv_bn_act(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: Option<&Relu>,
) -> Tensor<4> {
    let device = x.device();
    if device.is_autodiff() {
        let y = kiln_kernels::conv2d(conv, x);
        return kiln_kernels::batch_norm_act(bn, y, residual, relu.is_some());
    }
    let [c_out, ..] = conv.weight.dims();
    let mean = bn.running_mean.value().to_device(&device);
    let var = bn.running_var.value().to_device(&device);
    let scale = bn.gamma.val().to_device(&device) / (var + bn.epsilon).sqrt();
    let mut shift = bn.beta.val().to_device(&device) - mean * scale.clone();
    if let Some(bias) = &conv.bias {
        shift = shift + bias.val().to_device(&device) * scale.clone();
    }
    let weight = conv.weight.val().to_device(&device) * scale.reshape([c_out, 1, 1, 1]);
    let folded = Conv2d {
        weight: Param::from_tensor(weight),
        bias: Some(Param::from_tensor(shift)),
        ..conv.clone()
    };
    let mut out = kiln_kernels::conv2d(&folded, x);
    if let Some(r) = residual {
        out = out + r;
    }
    match relu {
        Some(relu) => relu.forward(out),
        None => out,
    }
}

/// The shortcut of a block that changes resolution or width: a strided 1x1 convolution and a
/// batch norm (torchvision's `downsample.0` and `downsample.1`; the importer maps those names).
#[derive(Module, Debug)]
pub struct Downsample {
    /// `downsample.0`.
    pub conv: Conv2d,
    /// `downsample.1`.
    pub bn: BatchNorm,
}

impl Downsample {
    fn new(inputs: usize, outputs: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: conv(inputs, outputs, 1, stride, device),
            bn: norm(outputs, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_bn(&self.conv, &self.bn, x)
    }

    /// The shortcut a block from `inputs` to `outputs` channels at `stride` needs, if any.
    fn needed(inputs: usize, outputs: usize, stride: usize, device: &Device) -> Option<Self> {
        (stride != 1 || inputs != outputs).then(|| Self::new(inputs, outputs, stride, device))
    }
}

/// The residual branch's partner: `x` itself, or its projection when the shape changes.
fn shortcut(downsample: Option<&Downsample>, x: Tensor<4>) -> Tensor<4> {
    match downsample {
        Some(d) => d.forward(x),
        None => x,
    }
}

/// ResNet-18/34's block: two 3x3 convolutions.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// 3x3, carries the stride.
    pub conv1: Conv2d,
    /// After `conv1`.
    pub bn1: BatchNorm,
    /// 3x3.
    pub conv2: Conv2d,
    /// After `conv2`.
    pub bn2: BatchNorm,
    /// Shortcut projection, when the shape changes.
    pub downsample: Option<Downsample>,
    relu: Relu,
}

impl BasicBlock {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 1;

    pub(crate) fn new(inputs: usize, planes: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: conv(inputs, planes, 3, stride, device),
            bn1: norm(planes, device),
            conv2: conv(planes, planes, 3, 1, device),
            bn2: norm(planes, device),
            downsample: Downsample::needed(inputs, planes, stride, device),
            relu: Relu::new(),
        }
    }

    /// `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(self.downsample.as_ref(), x.clone());
        let relu = Some(&self.relu);
        let out = conv_bn_act(&self.conv1, &self.bn1, x, None, relu);
        conv_bn_act(&self.conv2, &self.bn2, out, Some(identity), relu)
    }
}

/// ResNet-50's block: 1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 reduction.
    pub conv1: Conv2d,
    /// After `conv1`.
    pub bn1: BatchNorm,
    /// 3x3, carries the stride.
    pub conv2: Conv2d,
    /// After `conv2`.
    pub bn2: BatchNorm,
    /// 1x1 expansion to `4 * planes`.
    pub conv3: Conv2d,
    /// After `conv3`.
    pub bn3: BatchNorm,
    /// Shortcut projection, when the shape changes.
    pub downsample: Option<Downsample>,
    relu: Relu,
}

impl Bottleneck {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 4;

    pub(crate) fn new(inputs: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let outputs = planes * Self::EXPANSION;
        Self {
            conv1: conv(inputs, planes, 1, 1, device),
            bn1: norm(planes, device),
            conv2: conv(planes, planes, 3, stride, device),
            bn2: norm(planes, device),
            conv3: conv(planes, outputs, 1, 1, device),
            bn3: norm(outputs, device),
            downsample: Downsample::needed(inputs, outputs, stride, device),
            relu: Relu::new(),
        }
    }

    /// The bottleneck residual.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = shortcut(self.downsample.as_ref(), x.clone());
        let relu = Some(&self.relu);
        let out = conv_bn_act(&self.conv1, &self.bn1, x, None, relu);
        let out = conv_bn_act(&self.conv2, &self.bn2, out, None, relu);
        conv_bn_act(&self.conv3, &self.bn3, out, Some(identity), relu)
    }
}

/// One residual block of either kind. The importer ignores variant names, so parameters keep
/// torchvision's paths (`layer1.0.conv1.weight`).
// A model holds a few dozen blocks, all of one kind: the size gap between the variants costs
// a few KiB, and boxing them would not fit Burn's module derive.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ResidualBlock {
    /// ResNet-18/34.
    Basic(BasicBlock),
    /// ResNet-50 and deeper.
    Bottleneck(Bottleneck),
}

impl ResidualBlock {
    /// The block's forward pass.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            ResidualBlock::Basic(b) => b.forward(x),
            ResidualBlock::Bottleneck(b) => b.forward(x),
        }
    }
}
