//! A pipeline step's scope on one thread, in which the listed weights stay constant.
//!
//! A pipeline stage runs the forward and backward passes of each micro-batch on its own and sums
//! the parameter gradients. For a layer whose weights are large next to its activations
//! (ResNet's `layer3`/`layer4` at small feature maps), the per-micro-batch work on the weights
//! costs more than the arithmetic: every micro-batch writes a full weight-sized gradient, the
//! sum reads and rewrites it, and a kernel with taps that never meet the input is cut
//! ([`conv::cut_kernel`]) in the forward pass and again in the backward pass. Between [`start`]
//! and [`finish`], on this thread, kiln's convolution does that work once per step for the
//! listed weights (the stage's parameters, which the optimizer only changes after the step):
//!
//! - **Deferred weight gradients.** `dW = sum over samples of dY * X^T` does not feed the rest
//!   of the backward pass, so it can wait: the backward pass computes the input and bias
//!   gradients as usual but keeps `X` and `dY` instead of the weight's gradient, and [`finish`]
//!   computes each weight's gradient once over all the kept micro-batches, as one batch. This
//!   is the "W" pass of zero-bubble pipeline schedules (Qi et al., 2023): besides the saved
//!   work, the stage sends its last input gradient upstream before the deferred work runs. A
//!   weight is deferred only when what it keeps, `micro_batches * (X + dY)`, is no larger than
//!   the weight itself, so deferral never holds more memory than the gradient sum it replaces.
//!   The sum is the same up to float rounding (the samples are summed in one GEMM).
//! - **Cut kernels kept.** A listed weight's cut kernel is made by the first micro-batch and
//!   reused by the others, forward and backward.
//!
//! The state is per thread: Burn runs a graph's backward steps on the thread that calls
//! `backward`, which for a pipeline stage is the stage's own thread. Outside a step (no
//! [`start`] on this thread), or for weights not listed, nothing changes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::{BackendTensor, DispatchTensorKind};
use burn::tensor::Tensor;

use crate::conv::{self, Conv2dShape};

/// The identity of a tracked parameter tensor in Burn's autodiff graph (the same for every
/// forward pass until the optimizer replaces the tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey(u64);

/// `tensor`'s autodiff node, when it is a tracked tensor on Flex (the backend whose
/// convolution backward defers); `None` for any other tensor.
pub fn node_key<const D: usize>(tensor: &Tensor<D>) -> Option<NodeKey> {
    match tensor.clone().into_dispatch().kind {
        DispatchTensorKind::Autodiff(inner) => match *inner {
            DispatchTensorKind::Flex(BackendTensor::Autodiff(t)) => Some(NodeKey(t.id().value)),
            _ => None,
        },
        _ => None,
    }
}

/// One micro-batch's convolution, kept for its weight gradient.
struct Kept {
    shape: Conv2dShape,
    x: FlexTensor,
    grad_out: FlexTensor,
}

/// A step open on one thread: its weights, the micro-batches kept for their gradients, their
/// cut kernels.
struct OpenStep {
    weights: HashSet<NodeKey>,
    micro_batches: usize,
    kept: HashMap<NodeKey, Vec<Kept>>,
    /// Cut kernels ([`conv::cut_kernel`]) of the listed weights, by weight and geometry
    /// (batch size 0): made by the first micro-batch, reused by the others.
    cuts: HashMap<(NodeKey, Conv2dShape), Arc<[f32]>>,
}

thread_local! {
    static STEP: RefCell<Option<OpenStep>> = const { RefCell::new(None) };
}

/// Opens a step of `micro_batches` micro-batches on this thread for the convolution weights
/// `weights` (see the module docs): their gradients may be deferred, their cut kernels are
/// kept. Anything kept by an earlier [`start`] that was not [`finish`]ed is dropped.
pub fn start(weights: impl IntoIterator<Item = NodeKey>, micro_batches: usize) {
    let step = OpenStep {
        weights: weights.into_iter().collect(),
        micro_batches: micro_batches.max(1),
        kept: HashMap::new(),
        cuts: HashMap::new(),
    };
    STEP.with(|d| *d.borrow_mut() = Some(step));
}

/// Closes the step on this thread and drops what it kept (a step that failed).
pub fn discard() {
    STEP.with(|d| d.borrow_mut().take());
}

/// Whether a step is open on this thread.
#[cfg(test)]
fn is_active() -> bool {
    STEP.with(|d| d.borrow().is_some())
}

/// Closes the step on this thread and returns the weight gradient of every weight that had
/// micro-batches kept, summed over them: `(key, values)` with the weight's own length and
/// layout (`[C_out, C_in, kh, kw]`). Weights listed in [`start`] but never deferred are absent:
/// their gradients went through Burn's graph as usual.
pub fn finish() -> Vec<(NodeKey, Vec<f32>)> {
    let Some(step) = STEP.with(|d| d.borrow_mut().take()) else {
        return Vec::new();
    };
    step.kept
        .into_iter()
        .map(|(key, kept)| (key, weight_gradient(&kept)))
        .collect()
}

/// The sum of the kept micro-batches' weight gradients: micro-batches of one geometry are
/// concatenated into one batch and go through one weight-gradient pass.
fn weight_gradient(kept: &[Kept]) -> Vec<f32> {
    let mut sum: Vec<f32> = Vec::new();
    let mut done = vec![false; kept.len()];
    for first in 0..kept.len() {
        if done[first] {
            continue;
        }
        let same = |k: &Kept| {
            Conv2dShape {
                batch: kept[first].shape.batch,
                ..k.shape
            } == kept[first].shape
        };
        let group: Vec<usize> = (first..kept.len())
            .filter(|&i| !done[i] && same(&kept[i]))
            .collect();
        let batch: usize = group.iter().map(|&i| kept[i].shape.batch).sum();
        let shape = Conv2dShape {
            batch,
            ..kept[first].shape
        };
        let mut x = Vec::with_capacity(batch * shape.input_sample());
        let mut grad_out = Vec::with_capacity(batch * shape.output_sample());
        for &i in &group {
            x.extend_from_slice(kept[i].x.storage::<f32>());
            grad_out.extend_from_slice(kept[i].grad_out.storage::<f32>());
            done[i] = true;
        }
        let mut grad = vec![0.0f32; shape.weight_len()];
        conv::conv2d_backward_weight(&shape, &x, &grad_out, &mut grad, None);
        if sum.is_empty() {
            sum = grad;
        } else {
            for (s, g) in sum.iter_mut().zip(&grad) {
                *s += g;
            }
        }
    }
    sum
}

/// The cut kernel of `weight` (`values`) for a convolution of shape `s`, kept for the rest of
/// the step: `Some` when a step is open on this thread, lists `weight`, and `s` cuts taps
/// ([`conv::cut_kernel`]); the listed weights do not change during a step.
pub(crate) fn cut_kernel(weight: NodeId, s: &Conv2dShape, values: &[f32]) -> Option<Arc<[f32]>> {
    STEP.with(|d| {
        let mut d = d.borrow_mut();
        let step = d.as_mut()?;
        let key = NodeKey(weight.value);
        if !step.weights.contains(&key) {
            return None;
        }
        let geometry = Conv2dShape { batch: 0, ..*s };
        if let Some(cut) = step.cuts.get(&(key, geometry)) {
            return Some(cut.clone());
        }
        let cut: Arc<[f32]> = conv::cut_kernel(s, values)?.into();
        step.cuts.insert((key, geometry), cut.clone());
        Some(cut)
    })
}

/// Called by the convolution backward for a weight node: keeps `x` and `grad_out` (contiguous)
/// and returns `true` when a step is open on this thread, lists `weight`, and the kept data
/// stays within the weight's size; else `false` (the caller computes the gradient now).
pub(crate) fn defer(
    weight: NodeId,
    shape: &Conv2dShape,
    x: &FlexTensor,
    grad_out: &FlexTensor,
) -> bool {
    STEP.with(|d| {
        let mut d = d.borrow_mut();
        let Some(step) = d.as_mut() else {
            return false;
        };
        let key = NodeKey(weight.value);
        let kept_len = shape.batch * (shape.input_sample() + shape.output_sample());
        if !step.weights.contains(&key) || step.micro_batches * kept_len > shape.weight_len() {
            return false;
        }
        step.kept.entry(key).or_default().push(Kept {
            shape: *shape,
            x: x.clone(),
            grad_out: grad_out.clone(),
        });
        true
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::flex::Layout;
    use burn::backend::{Bytes, DType, Shape};

    use super::*;
    use crate::test_values::values;

    fn flex(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
        FlexTensor::new(
            Bytes::from_elems(values),
            Layout::contiguous(Shape::from(shape.to_vec())),
            DType::F32,
        )
    }

    fn kept(s: Conv2dShape, seed: u32) -> Kept {
        let x = values(s.batch * s.input_sample(), seed);
        let grad_out = values(s.batch * s.output_sample(), seed + 1);
        Kept {
            shape: s,
            x: flex(x, [s.batch, s.channels_in, s.height, s.width]),
            grad_out: flex(
                grad_out,
                [s.batch, s.channels_out, s.out_height(), s.out_width()],
            ),
        }
    }

    /// Micro-batches of two geometries (a weight used on 2x2 and on 1x1 maps, the first twice)
    /// sum to the weight gradients of each micro-batch computed on its own.
    #[test]
    fn kept_micro_batches_sum_to_their_own_gradients() {
        let at = |batch, side| Conv2dShape {
            batch,
            channels_in: 6,
            height: side,
            width: side,
            channels_out: 5,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
        };
        let all = [kept(at(2, 2), 1), kept(at(3, 1), 3), kept(at(1, 2), 5)];
        let mut expected = vec![0.0f32; at(1, 1).weight_len()];
        for k in &all {
            let mut grad = vec![0.0f32; expected.len()];
            conv::conv2d_backward_weight(
                &k.shape,
                k.x.storage::<f32>(),
                k.grad_out.storage::<f32>(),
                &mut grad,
                None,
            );
            for (e, g) in expected.iter_mut().zip(&grad) {
                *e += g;
            }
        }
        let got = weight_gradient(&all);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            ); // NaN fails
        assert!(worst < 1e-5, "{worst}");
        assert!(expected.iter().any(|&e| e.abs() > 0.1));
    }

    /// Deferral needs a step on this thread, a listed weight and a weight larger than what it
    /// would keep.
    #[test]
    fn only_listed_weights_larger_than_their_activations_are_deferred() {
        let s = Conv2dShape {
            batch: 2,
            channels_in: 16,
            height: 1,
            width: 1,
            channels_out: 16,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
        };
        let k = kept(s, 7);
        let (listed, other) = (NodeId { value: 1 }, NodeId { value: 2 });
        assert!(!defer(listed, &s, &k.x, &k.grad_out), "no step started");
        start([NodeKey(1)], 4);
        assert!(is_active());
        assert!(!defer(other, &s, &k.x, &k.grad_out), "not listed");
        // 4 micro-batches x 2 x (16 + 16) = 256 kept values <= 2,304 weights.
        assert!(defer(listed, &s, &k.x, &k.grad_out));
        let wide = Conv2dShape {
            height: 8,
            width: 8,
            ..s
        };
        let k_wide = kept(wide, 9);
        // 4 x 2 x (1,024 + 1,024) kept values > 2,304 weights.
        assert!(!defer(listed, &wide, &k_wide.x, &k_wide.grad_out));
        // The centre tap of the 1x1 map, cut once and kept.
        let weight = values(s.weight_len(), 11);
        let first = cut_kernel(listed, &s, &weight).expect("a 1x1 map cuts taps");
        let again = cut_kernel(listed, &s, &weight).expect("kept");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(Some(first.to_vec()), conv::cut_kernel(&s, &weight));
        assert!(
            cut_kernel(listed, &wide, &weight).is_none(),
            "no taps cut at 8x8"
        );
        let finished = finish();
        assert!(!is_active());
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].0, NodeKey(1));
        assert_eq!(finished[0].1.len(), s.weight_len());
    }
}
