//! Fake quantization for quantization-aware training: weights are rounded to the values the
//! quantized model will hold in the forward pass, while gradients pass through unchanged
//! (the straight-through estimator).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

use super::scheme::QuantScheme;
use super::weights::MIN_RANGE;

/// Rounds a `[channels, per_channel]` weight (PyTorch's layout flattened to 2-D) to its
/// quantized values, `dequantize(quantize(w))`, in tensor operations: the same arithmetic as
/// [`super::QuantizedTensor`], so a converted model holds exactly the weights it trained with.
/// No straight-through term: see [`fake_quantize`] for that.
pub fn quantize_dequantize(weight: Tensor<2>, scheme: QuantScheme) -> Tensor<2> {
    let [channels, per_channel] = weight.dims();
    let layout = scheme.granularity.groups(channels, per_channel);
    let qmax = scheme.bits.qmax();
    let padded = if layout.padded_channel > per_channel {
        let zeros = Tensor::zeros(
            [channels, layout.padded_channel - per_channel],
            &weight.device(),
        );
        Tensor::cat(vec![weight, zeros], 1)
    } else {
        weight
    };
    let grouped = padded.reshape([layout.groups, layout.group_len]);
    let scale = grouped
        .clone()
        .abs()
        .max_dim(1)
        .clamp_min(MIN_RANGE)
        .div_scalar(qmax);
    let rounded = grouped
        .div(scale.clone())
        .round()
        .clamp(-qmax, qmax)
        .mul(scale);
    rounded
        .reshape([channels, layout.padded_channel])
        .slice([0..channels, 0..per_channel])
}

/// Where the quantized weights of a model are: Linear and Conv2d weights. Biases and
/// normalisation parameters stay in float, as in PyTorch's quantized modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightKind {
    /// Burn's `[in, out]` Linear weight (the transpose of PyTorch's).
    Linear,
    /// `[out, in, kh, kw]` convolution weight.
    Conv,
}

impl WeightKind {
    fn of(container: &str, rank: usize) -> Option<Self> {
        match (container, rank) {
            ("Struct:Linear", 2) => Some(WeightKind::Linear),
            ("Struct:Conv2d", 4) => Some(WeightKind::Conv),
            _ => None,
        }
    }
}

/// Applies `f` to a weight in PyTorch's 2-D layout `[out, in*kh*kw]` and returns the result
/// in the weight's own shape.
fn in_pytorch_layout<const D: usize>(
    weight: Tensor<D>,
    kind: WeightKind,
    f: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> Tensor<D> {
    let dims = weight.dims();
    match kind {
        WeightKind::Linear => {
            let burn: Tensor<2> = weight.reshape([dims[0], dims[1]]);
            f(burn.transpose()).transpose().reshape(dims)
        }
        WeightKind::Conv => {
            let out = dims[0];
            let rest = dims.iter().skip(1).product::<usize>();
            f(weight.reshape([out, rest])).reshape(dims)
        }
    }
}

/// Maps every Linear and Conv2d weight through quantize-dequantize.
struct FakeQuantizer {
    scheme: QuantScheme,
    /// Container types of the modules entered, innermost last.
    containers: Vec<String>,
    straight_through: bool,
}

impl ModuleMapper for FakeQuantizer {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let container = self.containers.last().map_or("", String::as_str);
        let Some(kind) = WeightKind::of(container, D) else {
            return param;
        };
        let scheme = self.scheme;
        let straight_through = self.straight_through;
        param.map(|weight| {
            let rounded =
                in_pytorch_layout(weight.clone(), kind, |w| quantize_dequantize(w, scheme));
            if straight_through {
                // Forward: the rounded value. Backward: identity to the float weight.
                weight.clone() + (rounded - weight).detach()
            } else {
                rounded
            }
        })
    }
}

/// `model` with its Linear and Conv2d weights fake-quantized for a training step: the forward
/// pass sees the quantized values, the gradient flows to the float weights as if rounding were
/// the identity (straight-through estimator). Parameter ids are kept, so gradients taken from
/// the result's loss are read from `model`'s parameters as usual.
pub fn fake_quantize<M: Module>(model: M, scheme: QuantScheme) -> M {
    model.map(&mut FakeQuantizer {
        scheme,
        containers: Vec::new(),
        straight_through: true,
    })
}

/// `model` with its Linear and Conv2d weights replaced by their quantized values (no
/// gradient path): what evaluating a quantization-aware checkpoint runs.
pub fn round_weights<M: Module>(model: M, scheme: QuantScheme) -> M {
    model.map(&mut FakeQuantizer {
        scheme,
        containers: Vec::new(),
        straight_through: false,
    })
}
