//! The kernels as a Burn backend extension: [`CpuKernels`] is implemented for Flex (forward
//! only) and for `Autodiff<Flex, C>` (forward plus a handwritten backward that calls
//! [`crate::conv`] and [`crate::pool`]). Burn's `Dispatch` routes a call to the tensor's backend.

use std::sync::Arc;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Bytes, DType, Flex, Shape, backend_extension};

use crate::attention::{self, AttentionShape};
use crate::conv::{self, Conv2dShape};
use crate::gelu;
use crate::layer_norm;
use crate::norm::{self, NormShape};
use crate::optim;
use crate::pool::{self, Pool2dShape};
use crate::step;

/// Convolution and max-pool with kiln's CPU kernels (`f32`, NCHW).
#[backend_extension(Flex, Autodiff)]
pub trait CpuKernels: Backend {
    /// 2-D convolution, groups 1, dilation 1; `bias` has one value per output channel.
    fn kiln_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// 2-D max-pool, dilation 1, floor mode.
    fn kiln_max_pool2d(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// GELU (erf-based, as PyTorch's `nn.GELU()`) of every element of `x`, any rank;
    /// differentiable in `x`.
    fn kiln_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Layer normalisation of `x` over its last dimension (of `gamma`'s length), scaled by
    /// `gamma` and shifted by `beta`; differentiable in all three.
    fn kiln_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// Causal self-attention of `qkv` (`[batch, tokens, 3 x width]`, queries, keys and values
    /// of `heads` heads each) into `[batch, tokens, width]`; differentiable in `qkv`.
    fn kiln_causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;

    /// `x` unchanged; in the backward pass its gradient goes through `reduce` (e.g. a sum over
    /// the ranks of a tensor-parallel group: Megatron's "f"). Any rank.
    fn kiln_reduce_grad(x: FloatTensor<Self>, reduce: GradReduce) -> FloatTensor<Self>;

    /// [`CpuKernels::kiln_reduce_grad`] scheduled by `clock`: a tensor that needs no gradient,
    /// whose depth in the autodiff graph becomes the op's. Burn's backward runs the graph's
    /// steps deepest first, so the deeper the clock, the earlier `reduce` runs.
    fn kiln_reduce_grad_at(
        x: FloatTensor<Self>,
        clock: FloatTensor<Self>,
        reduce: GradReduce,
    ) -> FloatTensor<Self>;

    /// Batch statistics of `x` (`[batch, channels, height, width]`) as a `[2, channels]` tensor:
    /// the per-channel mean, then the biased variance. Not differentiable (no gradient flows
    /// back from it); [`CpuKernels::kiln_batch_norm_train`] accounts for the statistics'
    /// dependence on `x`.
    fn kiln_batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Training-mode batch norm of `x` with its own batch statistics `stats` (from
    /// [`CpuKernels::kiln_batch_norm_stats`] of the same `x`), then a ReLU when `relu`, in one
    /// pass: differentiable in `x`, `gamma` and `beta`, the gradient of `x` including the path
    /// through the statistics.
    fn kiln_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        relu: bool,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// One SGD-with-momentum step ([`crate::optim::sgd_momentum`]): the new parameter and
    /// velocity, written into `param`'s and `velocity`'s buffers when nothing else holds them
    /// (else into copies). `velocity` is not read on the `first` step. Not differentiable.
    fn kiln_sgd_momentum(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        lr: f64,
        momentum: f64,
        dampening: f64,
        first: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`CpuKernels::kiln_batch_norm_train`] with `residual` (the shape of `x`) added before the
    /// ReLU, in the same pass: ResNet's `relu(bn(conv(x)) + shortcut)`; differentiable in
    /// `residual` too.
    fn kiln_batch_norm_add_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        relu: bool,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

fn new_f32(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(Shape::from(shape)),
        DType::F32,
    )
}

fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Conv2dShape {
    let [batch, channels_in, height, width] = dims4(x);
    let [channels_out, _, kh, kw] = dims4(weight);
    Conv2dShape {
        batch,
        channels_in,
        height,
        width,
        channels_out,
        kernel: [kh, kw],
        stride,
        padding,
    }
}

/// The convolution of `x`; with `weight_node`, the autodiff node whose values `weight` holds, a
/// pipeline step reuses the weight's cut kernel ([`step::cut_kernel`]).
fn conv_forward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
    weight_node: Option<NodeId>,
) -> FlexTensor {
    let s = conv_shape(&x, &weight, stride, padding);
    let (x, weight, bias) = (
        x.to_contiguous(),
        weight.to_contiguous(),
        bias.to_contiguous(),
    );
    let mut out = vec![0.0f32; s.batch * s.output_sample()];
    let values = weight.storage::<f32>();
    let cut = weight_node.and_then(|node| step::cut_kernel(node, &s, values));
    conv::conv2d_forward_cut(
        &s,
        x.storage::<f32>(),
        values,
        cut.as_deref(),
        Some(bias.storage::<f32>()),
        &mut out,
    );
    new_f32(
        out,
        vec![s.batch, s.channels_out, s.out_height(), s.out_width()],
    )
}

fn pool_shape(
    x: &FlexTensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Pool2dShape {
    let [batch, channels, height, width] = dims4(x);
    Pool2dShape {
        batch,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
    }
}

fn pool_forward(x: FlexTensor, s: &Pool2dShape) -> (FlexTensor, Vec<u32>) {
    let x = x.to_contiguous();
    let mut out = vec![0.0f32; s.output_len()];
    let mut indices = vec![0u32; s.output_len()];
    pool::max_pool2d_forward(s, x.storage::<f32>(), &mut out, &mut indices);
    let shape = vec![s.batch, s.channels, s.out_height(), s.out_width()];
    (new_f32(out, shape), indices)
}

fn norm_shape(x: &FlexTensor) -> NormShape {
    let [batch, channels, height, width] = dims4(x);
    NormShape {
        batch,
        channels,
        plane: height * width,
    }
}

fn norm_stats(x: &FlexTensor) -> FlexTensor {
    let s = norm_shape(x);
    let x = x.clone().to_contiguous();
    let mut stats = vec![0.0f32; 2 * s.channels];
    let (mean, var) = stats.split_at_mut(s.channels);
    norm::batch_norm_stats(&s, x.storage::<f32>(), mean, var);
    new_f32(stats, vec![2, s.channels])
}

fn norm_forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    stats: &FlexTensor,
    residual: Option<FlexTensor>,
    relu: bool,
    epsilon: f64,
) -> FlexTensor {
    let s = norm_shape(&x);
    let shape = x.layout().shape().to_vec();
    let (x, gamma, beta, stats) = (
        x.to_contiguous(),
        gamma.to_contiguous(),
        beta.to_contiguous(),
        stats.clone().to_contiguous(),
    );
    let residual = residual.map(|r| r.to_contiguous());
    let (mean, var) = stats.storage::<f32>().split_at(s.channels);
    let mut out = vec![0.0f32; s.len()];
    norm::batch_norm_forward(
        &s,
        x.storage::<f32>(),
        mean,
        var,
        gamma.storage::<f32>(),
        beta.storage::<f32>(),
        epsilon,
        residual.as_ref().map(|r| r.storage::<f32>()),
        relu,
        &mut out,
    );
    new_f32(out, shape)
}

/// `t` contiguous, owning its buffer alone unless something else holds it too.
fn owned_contiguous(t: FlexTensor) -> FlexTensor {
    let contiguous = t.to_contiguous();
    drop(t);
    contiguous
}

fn sgd_step(
    param: FlexTensor,
    grad: FlexTensor,
    velocity: FlexTensor,
    [lr, momentum, dampening]: [f64; 3],
    first: bool,
) -> (FlexTensor, FlexTensor) {
    let mut param = owned_contiguous(param);
    let grad = owned_contiguous(grad);
    let mut velocity = if first {
        let n = param.layout().num_elements();
        new_f32(vec![0.0; n], param.layout().shape().to_vec())
    } else {
        owned_contiguous(velocity)
    };
    optim::sgd_momentum(
        param.storage_mut::<f32>(),
        grad.storage::<f32>(),
        velocity.storage_mut::<f32>(),
        lr as f32,
        momentum as f32,
        dampening as f32,
        first,
    );
    (param, velocity)
}

impl CpuKernels for Flex {
    fn kiln_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        conv_forward(x, weight, bias, stride, padding, None)
    }

    fn kiln_max_pool2d(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let s = pool_shape(&x, kernel, stride, padding);
        pool_forward(x, &s).0
    }

    fn kiln_batch_norm_stats(x: FlexTensor) -> FlexTensor {
        norm_stats(&x)
    }

    fn kiln_gelu(x: FlexTensor) -> FlexTensor {
        gelu_forward(&x)
    }

    fn kiln_causal_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        attention_forward(&qkv, heads).0
    }

    fn kiln_reduce_grad(x: FlexTensor, _reduce: GradReduce) -> FlexTensor {
        x
    }

    fn kiln_reduce_grad_at(x: FlexTensor, _clock: FlexTensor, _reduce: GradReduce) -> FlexTensor {
        x
    }

    fn kiln_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        layer_norm_forward(&x, &gamma, &beta, epsilon).0
    }

    fn kiln_sgd_momentum(
        param: FlexTensor,
        grad: FlexTensor,
        velocity: FlexTensor,
        lr: f64,
        momentum: f64,
        dampening: f64,
        first: bool,
    ) -> (FlexTensor, FlexTensor) {
        sgd_step(param, grad, velocity, [lr, momentum, dampening], first)
    }

    fn kiln_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        relu: bool,
        epsilon: f64,
    ) -> FlexTensor {
        norm_forward(x, gamma, beta, &stats, None, relu, epsilon)
    }

    fn kiln_batch_norm_add_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        residual: FlexTensor,
        relu: bool,
        epsilon: f64,
    ) -> FlexTensor {
        norm_forward(x, gamma, beta, &stats, Some(residual), relu, epsilon)
    }
}

/// A forward input a backward step checkpointed, contiguous.
fn checkpointed(checkpointer: &mut Checkpointer, id: NodeId) -> FlexTensor {
    checkpointer
        .retrieve_node_output::<FlexTensor>(id)
        .to_contiguous()
}

/// Backward step of [`CpuKernels::kiln_conv2d`]: parents are the input, weight and bias.
#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    type State = (NodeId, NodeId, [usize; 2], [usize; 2]);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x_state, weight_state, stride, padding) = ops.state;
        let x = checkpointed(checkpointer, x_state);
        let weight = checkpointed(checkpointer, weight_state);
        let s = conv_shape(&x, &weight, stride, padding);
        let grad_out = grad.storage::<f32>();

        if let Some(node) = node_x {
            let mut grad_x = vec![0.0f32; s.batch * s.input_sample()];
            let values = weight.storage::<f32>();
            let cut = node_weight
                .as_ref()
                .and_then(|node| step::cut_kernel(node.id, &s, values));
            conv::conv2d_backward_input_cut(&s, values, cut.as_deref(), grad_out, &mut grad_x);
            let shape = vec![s.batch, s.channels_in, s.height, s.width];
            grads.register::<Flex>(node.id, new_f32(grad_x, shape));
        }
        let deferred = node_weight
            .as_ref()
            .is_some_and(|node| step::defer(node.id, &s, &x, &grad));
        if deferred {
            if let Some(node) = node_bias {
                let mut grad_bias = vec![0.0f32; s.channels_out];
                conv::conv2d_backward_bias(&s, grad_out, &mut grad_bias);
                grads.register::<Flex>(node.id, new_f32(grad_bias, vec![s.channels_out]));
            }
        } else if node_weight.is_some() || node_bias.is_some() {
            let mut grad_weight = vec![0.0f32; s.weight_len()];
            let mut grad_bias = vec![0.0f32; s.channels_out];
            // A bias-free convolution (every ResNet one) skips the bias gradient's pass.
            conv::conv2d_backward_weight(
                &s,
                x.storage::<f32>(),
                grad_out,
                &mut grad_weight,
                node_bias.is_some().then_some(&mut grad_bias),
            );
            if let Some(node) = node_weight {
                let shape = weight.layout().shape().to_vec();
                grads.register::<Flex>(node.id, new_f32(grad_weight, shape));
            }
            if let Some(node) = node_bias {
                grads.register::<Flex>(node.id, new_f32(grad_bias, vec![s.channels_out]));
            }
        }
    }
}

/// What the max-pool backward step needs: the geometry and the forward's winning positions.
#[derive(Debug, Clone)]
struct PoolState {
    shape: Pool2dShape,
    indices: Arc<Vec<u32>>,
}

/// [`gelu::gelu`] of `x` (any rank) as a new contiguous tensor of its shape.
fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let x = x.to_contiguous();
    let mut out = vec![0.0f32; x.storage::<f32>().len()];
    gelu::gelu(x.storage::<f32>(), &mut out);
    new_f32(out, x.layout().shape().to_vec())
}

/// Backward step of [`CpuKernels::kiln_gelu`]; its state is the (contiguous) input.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        // Scaled in place when nothing else holds the output gradient (else copied first).
        let mut grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node_x {
            gelu::gelu_backward(ops.state.storage::<f32>(), grad.storage_mut::<f32>());
            grads.register::<Flex>(node.id, grad);
        }
    }
}

/// [`attention::causal_attention`] of `qkv` (contiguous) with `heads` heads: the output and
/// what the backward needs.
fn attention_forward(qkv: &FlexTensor, heads: usize) -> (FlexTensor, AttentionState) {
    let qkv = qkv.to_contiguous();
    let &[batch, tokens, packed] = qkv.layout().shape().as_slice() else {
        panic!("attention input of rank 3 expected");
    };
    let shape = AttentionShape {
        batch,
        tokens,
        heads,
        head_dim: packed / 3 / heads,
    };
    let mut out = vec![0.0f32; shape.out_len()];
    let mut probs = vec![0.0f32; shape.probs_len()];
    attention::causal_attention(&shape, qkv.storage::<f32>(), &mut out, &mut probs);
    let out = new_f32(out, vec![batch, tokens, shape.width()]);
    let state = AttentionState {
        qkv,
        probs: Arc::new(probs),
        shape,
    };
    (out, state)
}

/// What an attention's backward keeps: the (contiguous) input and the probabilities.
#[derive(Debug, Clone)]
struct AttentionState {
    qkv: FlexTensor,
    probs: Arc<Vec<f32>>,
    shape: AttentionShape,
}

/// Backward step of [`CpuKernels::kiln_causal_attention`].
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_qkv] = ops.parents;
        let grad_out = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node_qkv {
            let state = ops.state;
            let mut grad = vec![0.0f32; state.shape.qkv_len()];
            let inputs = (
                state.qkv.storage::<f32>(),
                state.probs.as_slice(),
                grad_out.storage::<f32>(),
            );
            attention::causal_attention_backward(&state.shape, inputs, &mut grad);
            grads.register::<Flex>(node.id, new_f32(grad, state.qkv.layout().shape().to_vec()));
        }
    }
}

/// [`layer_norm::layer_norm`] of `x` over its last dimension: the output (contiguous, `x`'s
/// shape) and each row's mean and reciprocal standard deviation.
fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, Vec<f32>) {
    let (x, gamma, beta) = (
        x.to_contiguous(),
        gamma.to_contiguous(),
        beta.to_contiguous(),
    );
    let values = x.storage::<f32>();
    let width = gamma.storage::<f32>().len().max(1);
    let mut out = vec![0.0f32; values.len()];
    let mut stats = vec![0.0f32; 2 * (values.len() / width)];
    layer_norm::layer_norm(
        values,
        gamma.storage::<f32>(),
        beta.storage::<f32>(),
        epsilon as f32,
        &mut out,
        &mut stats,
    );
    (new_f32(out, x.layout().shape().to_vec()), stats)
}

/// What a layer norm's backward keeps: the (contiguous) input and gamma, and the forward's
/// per-row statistics.
#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    stats: Arc<Vec<f32>>,
}

/// Backward step of [`CpuKernels::kiln_layer_norm`]: parents are the input, gamma and beta.
#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let state = ops.state;
        // The input gradient is written over the output gradient's buffer.
        let mut grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let width = state.gamma.storage::<f32>().len();
        let (mut grad_gamma, mut grad_beta) = (vec![0.0f32; width], vec![0.0f32; width]);
        layer_norm::layer_norm_backward(
            state.x.storage::<f32>(),
            state.gamma.storage::<f32>(),
            &state.stats,
            grad.storage_mut::<f32>(),
            &mut grad_gamma,
            &mut grad_beta,
        );
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, grad);
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, new_f32(grad_gamma, vec![width]));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, new_f32(grad_beta, vec![width]));
        }
    }
}

/// What the backward pass of [`CpuKernels::kiln_reduce_grad`] does with a gradient, in place
/// (it runs inside Burn's backward, which cannot fail: a failure is the callback's to record).
#[derive(Clone)]
pub struct GradReduce(pub Arc<GradReduceFn>);

/// The function inside a [`GradReduce`].
pub type GradReduceFn = dyn Fn(&mut [f32]) + Send + Sync;

impl std::fmt::Debug for GradReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradReduce")
    }
}

/// Backward step of [`CpuKernels::kiln_reduce_grad`] (`N = 1`) and
/// [`CpuKernels::kiln_reduce_grad_at`] (`N = 2`: the clock, which has no gradient).
#[derive(Debug)]
struct ReduceGradBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for ReduceGradBackward<N> {
    type State = GradReduce;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mut grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = ops.parents.into_iter().next().flatten() {
            (ops.state.0)(grad.storage_mut::<f32>());
            grads.register::<Flex>(node.id, grad);
        }
    }
}

/// `x` unchanged, recorded as [`ReduceGradBackward`] of the nodes `nodes` (`x`'s first).
fn reduce_grad_op<C: CheckpointStrategy, const N: usize>(
    x: &FloatTensor<Autodiff<Flex, C>>,
    nodes: [NodeGuard; N],
    reduce: GradReduce,
) -> FloatTensor<Autodiff<Flex, C>> {
    let out = x.primitive().clone();
    match ReduceGradBackward::<N>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(reduce, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Backward step of [`CpuKernels::kiln_max_pool2d`].
#[derive(Debug)]
struct MaxPool2dBackward;

impl Backward<Flex, 1> for MaxPool2dBackward {
    type State = PoolState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node_x {
            let s = ops.state.shape;
            let mut grad_x = vec![0.0f32; s.input_len()];
            pool::max_pool2d_backward(&s, grad.storage::<f32>(), &ops.state.indices, &mut grad_x);
            let shape = vec![s.batch, s.channels, s.height, s.width];
            grads.register::<Flex>(node.id, new_f32(grad_x, shape));
        }
    }
}

/// What a batch norm's backward step keeps: the input and gamma (checkpointed), the batch
/// statistics, epsilon, and with a ReLU the forward's output (its mask).
#[derive(Debug, Clone)]
struct NormState {
    x: NodeId,
    gamma: NodeId,
    stats: FlexTensor,
    epsilon: f64,
    relu_out: Option<FlexTensor>,
}

/// The batch norm's backward: gradients of `x`, gamma and beta (parents 0 to 2), and of the
/// residual (parent 3, when there is one): the ReLU-masked output gradient.
fn norm_backward<const N: usize>(
    ops: Ops<NormState, N>,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let [node_x, node_gamma, node_beta] = [0, 1, 2].map(|i| ops.parents[i].clone());
    let node_residual = ops.parents.get(3).cloned().flatten();
    let state = ops.state;
    // Masked in place when it is not shared (else copied first).
    let mut grad = grads.consume::<Flex>(&ops.node).to_contiguous();
    let x = checkpointed(checkpointer, state.x);
    let gamma = checkpointed(checkpointer, state.gamma);
    let stats = state.stats.to_contiguous();
    let relu_out = state.relu_out.map(|y| y.to_contiguous());
    let s = norm_shape(&x);
    let (mean, var) = stats.storage::<f32>().split_at(s.channels);
    // Without a residual, the input gradient goes over the output gradient's buffer.
    let mut grad_x = node_residual.is_some().then(|| vec![0.0f32; s.len()]);
    let mut grad_gamma = vec![0.0f32; s.channels];
    let mut grad_beta = vec![0.0f32; s.channels];
    norm::batch_norm_backward(
        &s,
        x.storage::<f32>(),
        mean,
        var,
        gamma.storage::<f32>(),
        state.epsilon,
        grad.storage_mut::<f32>(),
        relu_out.as_ref().map(|y| y.storage::<f32>()),
        grad_x.as_deref_mut(),
        &mut grad_gamma,
        &mut grad_beta,
    );
    let shape = x.layout().shape().to_vec();
    let (grad_x, grad_residual) = match grad_x {
        Some(dx) => (new_f32(dx, shape), Some(grad)),
        None => (grad, None),
    };
    if let Some(node) = node_x {
        grads.register::<Flex>(node.id, grad_x);
    }
    if let Some(node) = node_gamma {
        grads.register::<Flex>(node.id, new_f32(grad_gamma, vec![s.channels]));
    }
    if let Some(node) = node_beta {
        grads.register::<Flex>(node.id, new_f32(grad_beta, vec![s.channels]));
    }
    if let (Some(node), Some(grad)) = (node_residual, grad_residual) {
        grads.register::<Flex>(node.id, grad);
    }
}

/// Backward step of [`CpuKernels::kiln_batch_norm_train`] (parents: the input, gamma and
/// beta) and [`CpuKernels::kiln_batch_norm_add_train`] (the residual too).
#[derive(Debug)]
struct BatchNormBackward;

impl<const N: usize> Backward<Flex, N> for BatchNormBackward {
    type State = NormState;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        norm_backward(ops, grads, checkpointer);
    }
}

/// Runs a batch norm prepared with its parents (`x`, gamma, beta, and the residual when there is
/// one): when tracked, checkpoints `x` and gamma and keeps the statistics, epsilon and (with a
/// ReLU) the output for [`BatchNormBackward`].
fn batch_norm_op<C: CheckpointStrategy, const N: usize>(
    kind: OpsKind<BatchNormBackward, Flex, NormState, C, N>,
    [x, gamma, beta]: [FloatTensor<Autodiff<Flex, C>>; 3],
    residual: Option<FloatTensor<Autodiff<Flex, C>>>,
    stats: FlexTensor,
    relu: bool,
    epsilon: f64,
) -> FloatTensor<Autodiff<Flex, C>> {
    type Input<C> = FloatTensor<Autodiff<Flex, C>>;
    let forward = |tensors: [Input<C>; 3], residual: Option<Input<C>>| {
        let [x, gamma, beta] = tensors.map(|t| t.into_primitive());
        let residual = residual.map(|r| r.into_primitive());
        norm_forward(x, gamma, beta, &stats, residual, relu, epsilon)
    };
    match kind {
        OpsKind::Tracked(mut prep) => {
            let (x_id, gamma_id) = (prep.checkpoint(&x), prep.checkpoint(&gamma));
            let out = forward([x, gamma, beta], residual);
            let state = NormState {
                x: x_id,
                gamma: gamma_id,
                relu_out: relu.then(|| out.clone()),
                stats: stats.clone(),
                epsilon,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward([x, gamma, beta], residual)),
    }
}

impl<C: CheckpointStrategy> CpuKernels for Autodiff<Flex, C> {
    fn kiln_batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <FloatTensor<Self>>::new(norm_stats(x.primitive()))
    }

    fn kiln_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive().to_contiguous();
                let gamma = gamma.into_primitive().to_contiguous();
                let (out, stats) = layer_norm_forward(&x, &gamma, beta.primitive(), epsilon);
                let state = LayerNormState {
                    x,
                    gamma,
                    stats: Arc::new(stats),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                let (x, gamma) = (x.primitive(), gamma.primitive());
                prep.finish(layer_norm_forward(x, gamma, beta.primitive(), epsilon).0)
            }
        }
    }

    fn kiln_causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, state) = attention_forward(qkv.primitive(), heads);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(attention_forward(qkv.primitive(), heads).0),
        }
    }

    fn kiln_reduce_grad(x: FloatTensor<Self>, reduce: GradReduce) -> FloatTensor<Self> {
        reduce_grad_op::<C, 1>(&x, [x.node()], reduce)
    }

    fn kiln_reduce_grad_at(
        x: FloatTensor<Self>,
        clock: FloatTensor<Self>,
        reduce: GradReduce,
    ) -> FloatTensor<Self> {
        reduce_grad_op::<C, 2>(&x, [x.node(), clock.node()], reduce)
    }

    fn kiln_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.into_primitive().to_contiguous();
                let out = gelu_forward(&input);
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(gelu_forward(x.primitive())),
        }
    }

    fn kiln_sgd_momentum(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        lr: f64,
        momentum: f64,
        dampening: f64,
        first: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (param, velocity) = sgd_step(
            param.into_primitive(),
            grad.into_primitive(),
            velocity.into_primitive(),
            [lr, momentum, dampening],
            first,
        );
        (
            <FloatTensor<Self>>::new(param),
            <FloatTensor<Self>>::new(velocity),
        )
    }

    fn kiln_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        relu: bool,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let kind = BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let stats = stats.into_primitive();
        batch_norm_op(kind, [x, gamma, beta], None, stats, relu, epsilon)
    }

    fn kiln_batch_norm_add_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        relu: bool,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let kind = BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node(), residual.node()])
            .compute_bound()
            .stateful();
        let stats = stats.into_primitive();
        batch_norm_op(kind, [x, gamma, beta], Some(residual), stats, relu, epsilon)
    }

    fn kiln_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        match Conv2dBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let weight_node = weight.id();
                let out = conv_forward(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    stride,
                    padding,
                    Some(weight_node),
                );
                prep.finish((x_state, weight_state, stride, padding), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                stride,
                padding,
                None,
            )),
        }
    }

    fn kiln_max_pool2d(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let s = pool_shape(x.primitive(), kernel, stride, padding);
        match MaxPool2dBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, indices) = pool_forward(x.into_primitive(), &s);
                let state = PoolState {
                    shape: s,
                    indices: Arc::new(indices),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(pool_forward(x.into_primitive(), &s).0),
        }
    }
}
