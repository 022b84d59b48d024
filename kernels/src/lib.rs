//! Kiln's CPU kernels for Burn's Flex backend.
//!
//! Burn's `Conv2d`, `MaxPool2d` and `BatchNorm` modules run, on Flex, a convolution backward
//! that transposes whole tensors and convolves with kernels the size of the feature map, a
//! max-pool that goes through a 3-D pool with `i64` indices, and a training batch norm built
//! from a dozen tensor ops. [`conv2d`], [`max_pool2d`] and [`batch_norm`] take the same modules
//! (same parameters, same records) and, when the input is an `f32` tensor on Flex and the layer
//! is of the common kind (groups 1, dilation 1, symmetric padding, floor mode; batch norm in
//! training mode), run kiln's kernels instead: im2col + packed GEMM forward and backward
//! ([`conv`]), Winograd F(2x2, 3x3) for the stride-1 3x3 layers where it pays ([`winograd`]), a
//! direct 2-D max-pool with `u32` winner offsets ([`pool`]) and a few-pass batch norm
//! ([`norm`]; [`batch_norm_act`] also adds a residual and applies a ReLU in the same pass).
//! Anything else, and every other backend (CUDA included), goes through the module's own
//! `forward`, so callers never need to check. [`sgd_momentum`] is the optimizer step the trainer
//! runs: one in-place parallel pass per parameter on Flex ([`optim`]), Burn's tensor ops
//! elsewhere, the same values either way.
//!
//! The fast path is on by default; [`set_enabled`] (or `KILN_CPU_KERNELS=burn` in the
//! environment) switches every call back to Burn's ops, which is how the benchmarks compare the
//! two in one run and how the tests compare them against each other
//! ([`winograd::set_enabled`] / `KILN_WINOGRAD=off` keeps the kernels but uses im2col for every
//! convolution). [`gelu`](fn@gelu) is a transformer MLP's activation, one parallel vectorised
//! pass each way instead of Burn's five ops around a scalar `erff`; [`causal_attention`] is a
//! GPT block's attention straight from its packed queries, keys and values.
//! [`malloc::keep_large_buffers`] is the allocator setting the `kiln` binary runs with.
//!
//! The slice kernels in [`conv`], [`winograd`], [`pool`] and [`norm`] use no Burn types, so they
//! could move into Flex as its `conv2d_x_backward` / `conv2d_weight_backward` / `max_pool2d` /
//! `batch_norm_train` implementations.

pub mod attention;
pub mod conv;
mod flex;
pub mod gelu;
pub mod int8;
pub mod isa;
pub mod layer_norm;
pub mod malloc;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod step;
pub mod winograd;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::{DType, DispatchDevice};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, LayerNorm, PaddingConfig2d};
use burn::tensor::Tensor;

pub use flex::{CpuKernels, GradReduce};

/// A process-wide on/off switch, on unless its environment variable holds the `off` value when
/// it is first read; [`Switch::set`] overrides it from then on.
pub(crate) struct Switch {
    /// 0: not decided yet (read the environment), 1: on, 2: off.
    mode: AtomicU8,
    var: &'static str,
    off: &'static str,
}

impl Switch {
    pub(crate) const fn new(var: &'static str, off: &'static str) -> Self {
        Switch {
            mode: AtomicU8::new(0),
            var,
            off,
        }
    }

    pub(crate) fn get(&self) -> bool {
        match self.mode.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v != self.off);
                self.set(on);
                on
            }
        }
    }

    pub(crate) fn set(&self, on: bool) {
        self.mode.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

static KERNELS: Switch = Switch::new("KILN_CPU_KERNELS", "burn");

/// Whether [`conv2d`], [`max_pool2d`] and [`batch_norm`] use kiln's kernels where they apply
/// (the default, unless the environment sets `KILN_CPU_KERNELS=burn`).
pub fn enabled() -> bool {
    KERNELS.get()
}

/// Switches kiln's kernels on or off for the whole process (off: Burn's own ops everywhere).
pub fn set_enabled(on: bool) {
    KERNELS.set(on);
}

/// Runs `f` on the first thread of rayon's global pool (the threads kiln's kernels and Burn's
/// Flex split their work over), and waits for it; on a pool thread already, runs it in place.
///
/// A thread outside the pool hands each parallel loop to the pool and sleeps until the pool
/// is done: two futex round trips per loop, and a training step of ResNet-18 at batch 32 x
/// 32x32 runs hundreds of short loops. Run from a pool thread, a loop starts on the caller's
/// own thread and the other threads join in (PyTorch's OpenMP model, where the main thread is
/// one of the pool's). Always the same thread, because Burn keys some state by thread: a
/// `BatchNorm`'s `RunningState` averages the updates of different threads, so steps taking
/// turns on two threads would not keep the running statistics of steps on one. `f` must not
/// block waiting for other work queued on the same pool (a rank of a collective running on it
/// would stop the pool thread it occupies).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let job = std::sync::Mutex::new(Some(f));
    // Every pool thread runs this once; the first one runs `f`, the others return at once to
    // the work `f`'s loops queue.
    let ran = rayon::broadcast(|thread| {
        if thread.index() != 0 {
            return None;
        }
        let f = job
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        f.map(|f| f())
    });
    ran.into_iter()
        .flatten()
        .next()
        .expect("a pool has a first thread, which ran the job")
}

/// Whether `device` is Burn's Flex CPU backend (where kiln's kernels run), with or without
/// autodiff.
pub fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `x` is an `f32` tensor on Flex, with or without autodiff.
fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && on_flex(&x.device())
}

/// Symmetric padding `[height, width]` of a padding configuration, when it has one that does not
/// depend on the input size.
fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// The padding `[height, width]` kiln's convolution kernel would run `conv` on `x` with, or
/// `None` when the layer or the tensor is not of the kind it handles.
fn conv2d_padding(conv: &Conv2d, x: &Tensor<4>) -> Option<[usize; 2]> {
    let [ph, pw] = symmetric_padding(&conv.padding)?;
    let [_, c_in, h, w] = x.dims();
    let [kh, kw] = conv.kernel_size;
    // Empty tensors, zero strides and channel mismatches go to Burn, which reports them.
    let fits = enabled()
        && x.dims().iter().all(|&d| d > 0)
        && conv.stride.iter().all(|&s| s > 0)
        && conv.weight.dims()[1] == c_in
        && conv.groups == 1
        && conv.dilation == [1, 1]
        && h + 2 * ph >= kh
        && w + 2 * pw >= kw
        && on_flex_f32(x);
    fits.then_some([ph, pw])
}

/// Whether [`conv2d`] runs kiln's kernel for this layer and input (else Burn's).
pub fn conv2d_uses_kernels(conv: &Conv2d, x: &Tensor<4>) -> bool {
    conv2d_padding(conv, x).is_some()
}

/// `conv.forward(x)`, through kiln's kernels when they apply (see the crate documentation).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some(padding) = conv2d_padding(conv, &x) else {
        return conv.forward(x);
    };
    let weight = conv.weight.val();
    let bias = match &conv.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([weight.dims()[0]], &x.device()),
    };
    let out = <burn::backend::Dispatch as CpuKernels>::kiln_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        conv.stride,
        padding,
    );
    Tensor::from_dispatch(out)
}

/// The padding `[height, width]` kiln's max-pool kernel would run `pool` on `x` with, or `None`
/// when the layer or the tensor is not of the kind it handles.
fn max_pool2d_padding(pool: &MaxPool2d, x: &Tensor<4>) -> Option<[usize; 2]> {
    let [ph, pw] = symmetric_padding(&pool.padding)?;
    let [_, _, h, w] = x.dims();
    let [kh, kw] = pool.kernel_size;
    let fits = enabled()
        && x.dims().iter().all(|&d| d > 0)
        && pool.stride.iter().all(|&s| s > 0)
        && pool.kernel_size.iter().all(|&k| k > 0)
        && !pool.ceil_mode
        && pool.dilation == [1, 1]
        && 2 * ph <= kh
        && 2 * pw <= kw
        && h + 2 * ph >= kh
        && w + 2 * pw >= kw
        && on_flex_f32(x);
    fits.then_some([ph, pw])
}

/// Whether [`max_pool2d`] runs kiln's kernel for this layer and input (else Burn's).
pub fn max_pool2d_uses_kernels(pool: &MaxPool2d, x: &Tensor<4>) -> bool {
    max_pool2d_padding(pool, x).is_some()
}

/// `pool.forward(x)`, through kiln's kernels when they apply (see the crate documentation).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let Some(padding) = max_pool2d_padding(pool, &x) else {
        return pool.forward(x);
    };
    let out = <burn::backend::Dispatch as CpuKernels>::kiln_max_pool2d(
        x.into_dispatch(),
        pool.kernel_size,
        pool.stride,
        padding,
    );
    Tensor::from_dispatch(out)
}

/// GELU of `x` (erf-based, as PyTorch's `nn.GELU()` and Burn's `activation::gelu`): kiln's
/// kernel ([`gelu::gelu`], one parallel vectorised pass forward and one backward) for `f32`
/// tensors on Flex, Burn's ops elsewhere or with the kernels switched off; the same values
/// within 2e-7 x max(1, |x|).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !(enabled() && on_flex_f32(&x)) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as CpuKernels>::kiln_gelu(
        x.into_dispatch(),
    ))
}

/// Causal self-attention of `qkv` (`[batch, tokens, 3 x width]`: queries, keys and values side
/// by side, each `heads` heads of `width / heads` values, as GPT's `c_attn` gives them) into
/// `[batch, tokens, width]`, scores scaled by `1 / sqrt(width / heads)`: kiln's kernel
/// ([`attention::causal_attention`], one parallel pass over the sequences each way) for `f32`
/// tensors on Flex, Burn's `attention` elsewhere or with the kernels switched off.
///
/// # Panics
/// When the last dimension is not a multiple of `3 x heads` (Burn's path would fail the same
/// way on its reshape).
pub fn causal_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    let [b, t, packed] = qkv.dims();
    assert!(
        heads > 0 && packed.is_multiple_of(3 * heads),
        "attention input of width {packed} does not split into 3 x {heads} heads"
    );
    if !(enabled() && on_flex_f32(&qkv) && b * t > 0) {
        return causal_attention_by_burn(qkv, heads);
    }
    Tensor::from_dispatch(
        <burn::backend::Dispatch as CpuKernels>::kiln_causal_attention(qkv.into_dispatch(), heads),
    )
}

/// [`causal_attention`] by Burn's ops ([`split_heads`], Burn's `attention` with a causal
/// mask, [`merge_heads`]): its fallback, and what the tests compare the kernel with.
pub fn causal_attention_by_burn(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    let [q, k, v] = split_heads(qkv, heads);
    let options = burn::tensor::ops::AttentionModuleOptions {
        is_causal: true,
        ..Default::default()
    };
    merge_heads(burn::tensor::module::attention(
        q, k, v, None, None, options,
    ))
}

/// Queries, keys and values `[batch, heads, tokens, width / heads]` of a packed
/// `[batch, tokens, 3 x width]` projection.
pub fn split_heads(qkv: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
    let [b, t, packed] = qkv.dims();
    let width = packed / 3;
    [0, 1, 2].map(|i| {
        qkv.clone()
            .narrow(2, i * width, width)
            .reshape([b, t, heads, width / heads])
            .swap_dims(1, 2)
    })
}

/// `[batch, tokens, heads x head_dim]` of per-head values `[batch, heads, tokens, head_dim]`.
pub fn merge_heads(y: Tensor<4>) -> Tensor<3> {
    let [b, heads, t, d] = y.dims();
    y.swap_dims(1, 2).reshape([b, t, heads * d])
}

/// `ln.forward(x)` with the layer's `epsilon` (Burn keeps it private: 1e-5 unless its config
/// chose another): kiln's kernel ([`layer_norm::layer_norm`], one parallel pass each way) for
/// `f32` tensors on Flex when the layer has a bias, Burn's ops elsewhere or with the kernels
/// switched off.
pub fn layer_norm<const D: usize>(ln: &LayerNorm, x: Tensor<D>, epsilon: f64) -> Tensor<D> {
    let fits = enabled() && on_flex_f32(&x) && x.dims()[D - 1] == ln.gamma.dims()[0];
    let Some(beta) = ln.beta.as_ref().filter(|_| fits) else {
        return ln.forward(x);
    };
    Tensor::from_dispatch(<burn::backend::Dispatch as CpuKernels>::kiln_layer_norm(
        x.into_dispatch(),
        ln.gamma.val().into_dispatch(),
        beta.val().into_dispatch(),
        epsilon,
    ))
}

/// `x` unchanged, its gradient passed through `reduce` in the backward pass (Megatron's "f":
/// identity forward, all-reduce backward, when `reduce` sums over a tensor-parallel group).
/// Only `f32` tensors on Flex have the op (Burn has no user-level custom backward): `None`
/// elsewhere. It runs whether or not kiln's kernels are switched off (it is not a speed-up).
pub fn reduce_grad<const D: usize>(x: Tensor<D>, reduce: GradReduce) -> Option<Tensor<D>> {
    on_flex_f32(&x).then(|| {
        Tensor::from_dispatch(<burn::backend::Dispatch as CpuKernels>::kiln_reduce_grad(
            x.into_dispatch(),
            reduce,
        ))
    })
}

/// [`reduce_grad`] at the depth of `clock` in the autodiff graph: Burn's backward runs the
/// graph's steps deepest first (not as soon as their gradient is complete), so an op on a
/// parameter, depth 1, would run after every other step. A `clock` that needs no gradient and
/// is deeper than the parameter's consumers' other inputs puts `reduce` right after those
/// consumers' backward (see [`backward_clocks`]). `None` off Flex or when `clock` is not on
/// `x`'s device.
pub fn reduce_grad_at<const D: usize>(
    x: Tensor<D>,
    clock: &Tensor<1>,
    reduce: GradReduce,
) -> Option<Tensor<D>> {
    (on_flex_f32(&x) && clock.device() == x.device()).then(|| {
        Tensor::from_dispatch(
            <burn::backend::Dispatch as CpuKernels>::kiln_reduce_grad_at(
                x.into_dispatch(),
                clock.clone().into_dispatch(),
                reduce,
            ),
        )
    })
}

/// Clock tensors for [`reduce_grad_at`] on `device`: the `k`-th is `depths[k]` operations
/// deep in the autodiff graph (a chain of one-element additions that need no gradient), so
/// an op on it sits at depth `depths[k] + 1`. The chain is as long as the largest depth.
pub fn backward_clocks(depths: &[usize], device: &burn::tensor::Device) -> Vec<Tensor<1>> {
    let deepest = depths.iter().copied().max().unwrap_or(0);
    let mut chain = Vec::with_capacity(deepest + 1);
    let mut clock = Tensor::<1>::zeros([1], device);
    for _ in 0..=deepest {
        chain.push(clock.clone());
        clock = clock + 0.0;
    }
    depths.iter().map(|&d| chain[d].clone()).collect()
}

/// Whether [`batch_norm`] runs kiln's kernels for this layer and input: training mode (an
/// autodiff device and a layer that is not frozen) on Flex with `f32` values.
pub fn batch_norm_uses_kernels(bn: &BatchNorm, x: &Tensor<4>) -> bool {
    let [_, channels, ..] = x.dims();
    enabled()
        && x.dims().iter().all(|&d| d > 0)
        && bn.gamma.dims() == [channels]
        && x.device().is_autodiff()
        && bn.training.is_enabled()
        && on_flex_f32(x)
}

/// `bn.forward(x)`, through kiln's kernels in training mode (see [`batch_norm_uses_kernels`]):
/// batch statistics, normalisation and its backward in a few passes instead of Burn's dozen
/// tensor ops. The running statistics are updated as Burn's `BatchNorm` updates them
/// (momentum-weighted, biased variance). Inference and frozen layers go to `bn.forward`.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    batch_norm_act(bn, x, None, false)
}

/// `bn.forward(x)`, then `+ residual` when given, then a ReLU when `relu`: ResNet's
/// `relu(bn(conv(x)))` and `relu(bn(conv(x)) + shortcut)`. In training mode on Flex (see
/// [`batch_norm_uses_kernels`]) the three are one pass forward and the ReLU's mask and the add
/// cost nothing extra backward (the residual's gradient is the masked output gradient);
/// otherwise Burn's ops run them one after the other, with the same values.
pub fn batch_norm_act(
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    let fused = batch_norm_uses_kernels(bn, &x)
        && residual
            .as_ref()
            .is_none_or(|r| r.dims() == x.dims() && on_flex_f32(r) && r.device() == x.device());
    if !fused {
        let mut out = bn.forward(x);
        if let Some(r) = residual {
            out = out + r;
        }
        return if relu {
            burn::tensor::activation::relu(out)
        } else {
            out
        };
    }
    let device = x.device();
    let [_, channels, ..] = x.dims();
    type Kernels = burn::backend::Dispatch;
    let stats: Tensor<2> = Tensor::from_dispatch(<Kernels as CpuKernels>::kiln_batch_norm_stats(
        x.clone().into_dispatch(),
    ));
    let (x, gamma, beta, batch_stats) = (
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        stats.clone().into_dispatch(),
    );
    let eps = bn.epsilon;
    let out = Tensor::from_dispatch(match residual {
        None => {
            <Kernels as CpuKernels>::kiln_batch_norm_train(x, gamma, beta, batch_stats, relu, eps)
        }
        Some(r) => <Kernels as CpuKernels>::kiln_batch_norm_add_train(
            x,
            gamma,
            beta,
            batch_stats,
            r.into_dispatch(),
            relu,
            eps,
        ),
    });
    let mean = stats.clone().narrow(0, 0, 1).reshape([channels]);
    let var = stats.narrow(0, 1, 1).reshape([channels]);
    let update = |state: &burn::module::RunningState<Tensor<1>>, batch: Tensor<1>| {
        let running = state
            .value_sync()
            .to_device(&device)
            .mul_scalar(1.0 - bn.momentum)
            .add(batch.detach().mul_scalar(bn.momentum));
        state.update(running.detach());
    };
    update(&bn.running_mean, mean);
    update(&bn.running_var, var);
    out
}

/// One SGD-with-momentum step on a parameter tensor (PyTorch's `SGD(lr, momentum, dampening)`
/// without weight decay or Nesterov, and Burn's `Sgd` with the same settings): returns the new
/// parameter and velocity; `velocity` is `None` on the first step (the velocity starts as the
/// gradient). On Flex with `f32` values it is one parallel pass that updates both in place
/// ([`optim::sgd_momentum`]); otherwise Burn's tensor ops compute the same formula in the same
/// order, so both give the same values to the bit.
pub fn sgd_momentum<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    velocity: Option<Tensor<D>>,
    lr: f64,
    momentum: f64,
    dampening: f64,
) -> (Tensor<D>, Tensor<D>) {
    let fits = enabled()
        && on_flex_f32(&param)
        && on_flex_f32(&grad)
        && grad.dims() == param.dims()
        && velocity
            .as_ref()
            .is_none_or(|v| on_flex_f32(v) && v.dims() == param.dims())
        && !param.device().is_autodiff();
    if !fits {
        let velocity = match velocity {
            Some(v) => grad.mul_scalar(1.0 - dampening).add(v.mul_scalar(momentum)),
            None => grad,
        };
        return (param - velocity.clone().mul_scalar(lr), velocity);
    }
    let first = velocity.is_none();
    let velocity = velocity.unwrap_or_else(|| grad.clone());
    let (param, velocity) = <burn::backend::Dispatch as CpuKernels>::kiln_sgd_momentum(
        param.into_dispatch(),
        grad.into_dispatch(),
        velocity.into_dispatch(),
        lr,
        momentum,
        dampening,
        first,
    );
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(velocity),
    )
}

/// Deterministic test data shared by the kernels' unit tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// `len` values in [-1, 1] from a xorshift generator seeded with `seed`.
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }
}
