//! Kiln's CPU kernels against Burn's own ops (the reference): forward values and the gradients
//! of input, weight and bias, within 1e-4, on random shapes with odd sizes, stride 1 and 2,
//! padding 0 and 1 (and the ResNet stem's 7x7 / 3), 1x1 convolutions and batch 1; and
//! `kiln check-device`, which compares whole models' logits and gradients the same way.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use std::cell::Cell;

use burn::tensor::{Device, Tensor, TensorData};
use kiln::kernels;
use kiln::kernels::winograd::Pass;

const TOLERANCE: f32 = 1e-4;

fn device() -> Device {
    Device::flex().autodiff()
}

thread_local! {
    /// The state of this test's generator: every test runs on a thread of its own, so each
    /// draws the same inputs on every run, whatever runs beside it (Burn's generator is
    /// process-wide and unseeded), and a failure can be replayed.
    static STATE: Cell<u64> = const { Cell::new(0x5EED_0FC0_FFEE) };
}

/// A uniform number in `(0, 1]` from this test's SplitMix64 generator.
fn unit() -> f64 {
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) + 1) as f64 / (1u64 << 53) as f64
    })
}

/// A tensor of standard normal values (Box-Muller) from this test's seeded generator.
fn random<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    let len = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..len)
        .map(|_| {
            let (u, v) = (unit(), unit());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &device())
}

/// Asserts that every element of `got` is within [`TOLERANCE`] of `want`, relative to the
/// larger of 1, the element and the root mean square of `want`: an f32 reduction's rounding
/// error scales with the size of its terms, not of its result, so a weight-gradient element
/// that sums thousands of products to nearly zero carries the error of its neighbours (Burn's
/// and kiln's summation orders differed by 1.4e-4 of 1 on a 65 -> 64 channel layer's weight
/// gradient, whose elements are about 45 in size).
fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.into_data().try_to_vec::<f32>().unwrap();
    let want = want.into_data().try_to_vec::<f32>().unwrap();
    let rms = (want.iter().map(|w| w * w).sum::<f32>() / want.len().max(1) as f32).sqrt();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(rms).max(1.0))
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        ); // NaN fails
    assert!(worst <= TOLERANCE, "{what}: worst difference {worst}");
}

/// One case: `[batch, channels_in, height, width]`, `channels_out`, kernel, stride, padding,
/// bias.
type ConvCase = ([usize; 4], usize, [usize; 2], [usize; 2], [usize; 2], bool);

fn conv_layer(&(shape, c_out, kernel, stride, padding, bias): &ConvCase) -> Conv2d {
    let mut conv = Conv2dConfig::new([shape[1], c_out], kernel)
        .with_stride(stride)
        .with_padding(PaddingConfig2d::Explicit(
            padding[0], padding[1], padding[0], padding[1],
        ))
        .with_bias(bias)
        .init(&device());
    // Normal weights (not Kaiming-small) so differences are not hidden by tiny values.
    conv.weight = Param::from_tensor(random([c_out, shape[1], kernel[0], kernel[1]]));
    if bias {
        conv.bias = Some(Param::from_tensor(random([c_out])));
    }
    conv
}

#[test]
fn conv2d_matches_burn_forward_and_gradients() {
    let cases: [ConvCase; 14] = [
        ([1, 1, 28, 28], 32, [3, 3], [1, 1], [1, 1], true),
        ([3, 32, 14, 14], 64, [3, 3], [1, 1], [1, 1], true),
        ([2, 3, 13, 11], 5, [3, 3], [2, 2], [1, 1], false),
        ([1, 4, 9, 7], 3, [3, 3], [2, 2], [0, 0], true),
        ([2, 3, 17, 15], 8, [7, 7], [2, 2], [3, 3], false),
        ([3, 6, 5, 5], 7, [1, 1], [1, 1], [0, 0], true),
        ([2, 6, 7, 9], 4, [1, 1], [2, 2], [0, 0], false),
        ([1, 2, 6, 5], 3, [3, 2], [1, 2], [1, 0], true),
        ([5, 3, 3, 3], 2, [3, 3], [1, 1], [0, 0], true),
        // Kernels cut to the taps that reach the input: 1x1 planes, and 2x2 to 1x1 at stride 2.
        ([3, 8, 1, 1], 6, [3, 3], [1, 1], [1, 1], true),
        ([2, 5, 2, 2], 4, [3, 3], [2, 2], [1, 1], false),
        // Winograd (stride-1 3x3, enough channels and tiles), padding 1 and 0, odd sizes.
        ([2, 64, 24, 25], 64, [3, 3], [1, 1], [1, 1], true),
        ([3, 65, 26, 30], 64, [3, 3], [1, 1], [0, 0], false),
        // 7x7 outputs take it for the forward pass and input gradient with 256 channels or more.
        ([8, 256, 7, 7], 256, [3, 3], [1, 1], [1, 1], true),
    ];
    for case in &cases {
        let conv = conv_layer(case);
        let x = random(case.0).require_grad();
        let r = random::<4>({
            let y = conv.forward(x.clone());
            y.dims()
        });
        assert!(
            kernels::conv2d_uses_kernels(&conv, &x),
            "{case:?} not on the fast path"
        );
        let (shape, c_out, kernel, stride, padding, _) = *case;
        let geometry = kernels::conv::Conv2dShape {
            batch: shape[0],
            channels_in: shape[1],
            height: shape[2],
            width: shape[3],
            channels_out: c_out,
            kernel,
            stride,
            padding,
        };
        // The three cases at the end are the Winograd ones (SimpleCNN's conv2 at batch 3 has
        // too few tiles), the last one for its forward pass and input gradient only.
        let winograd = |pass| kernels::winograd::applies(&geometry, pass);
        let expected = match (shape[1] >= 64, shape[3]) {
            (true, 7) => [true, true, false],
            (true, _) => [true; 3],
            (false, _) => [false; 3],
        };
        assert_eq!(
            [Pass::Forward, Pass::InputGradient, Pass::WeightGradient].map(winograd),
            expected,
            "{case:?}: Winograd or not"
        );

        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fast {
                kernels::conv2d(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            let dw = conv.weight.grad(&grads).expect("weight gradient");
            let db = conv
                .bias
                .as_ref()
                .map(|b| b.grad(&grads).expect("bias gradient"));
            (y, dx, dw, db)
        };
        let (y, dx, dw, db) = run(true);
        let (y_ref, dx_ref, dw_ref, db_ref) = run(false);
        let name = format!("{case:?}");
        assert_close(&format!("{name} output"), y.detach(), y_ref.detach());
        assert_close(&format!("{name} input gradient"), dx, dx_ref);
        assert_close(&format!("{name} weight gradient"), dw, dw_ref);
        if let (Some(db), Some(db_ref)) = (db, db_ref) {
            assert_close(&format!("{name} bias gradient"), db, db_ref);
        }
    }
}

/// One case: `[batch, channels, height, width]`, kernel, stride, padding.
type PoolCase = ([usize; 4], [usize; 2], [usize; 2], [usize; 2]);

#[test]
fn max_pool2d_matches_burn_forward_and_gradients() {
    let cases: [PoolCase; 6] = [
        ([64, 32, 28, 28], [2, 2], [2, 2], [0, 0]),
        ([1, 3, 7, 9], [2, 2], [2, 2], [0, 0]),
        ([2, 4, 15, 13], [3, 3], [2, 2], [1, 1]),
        ([1, 2, 8, 8], [3, 3], [1, 1], [1, 1]),
        ([3, 2, 5, 6], [2, 3], [1, 2], [1, 0]),
        ([2, 5, 4, 4], [4, 4], [4, 4], [0, 0]),
    ];
    for (shape, kernel, stride, padding) in cases {
        let pool: MaxPool2d = MaxPool2dConfig::new(kernel)
            .with_strides(stride)
            .with_padding(PaddingConfig2d::Explicit(
                padding[0], padding[1], padding[0], padding[1],
            ))
            .init();
        // Distinct values (a permutation) so that the winner of every window is unique and
        // both implementations must route each gradient to the same input.
        let len: usize = shape.iter().product();
        let x = random([len]);
        let x = x.argsort(0).float().reshape(shape) / (len as f32);
        assert!(
            kernels::max_pool2d_uses_kernels(&pool, &x),
            "{shape:?} not on the fast path"
        );
        let r = random::<4>(pool.forward(x.clone()).dims());
        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fast {
                kernels::max_pool2d(&pool, x.clone())
            } else {
                pool.forward(x.clone())
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            (y, x.grad(&grads).expect("input gradient"))
        };
        let (y, dx) = run(true);
        let (y_ref, dx_ref) = run(false);
        let name = format!("{shape:?} k{kernel:?} s{stride:?} p{padding:?}");
        assert_close(&format!("{name} output"), y.detach(), y_ref.detach());
        assert_close(&format!("{name} input gradient"), dx, dx_ref);
    }
}

#[test]
fn gelu_matches_burn_forward_and_gradient() {
    // A transposed input (not contiguous) and a rank-2 one, with large values in it.
    let x4 = (random([2, 3, 65, 17]) * 3.0).swap_dims(1, 3);
    let x2 = random([129, 300]) * 6.0;
    let run = |x: Tensor<4>, fast: bool| {
        let x = x.detach().require_grad();
        let y = if fast {
            kernels::gelu(x.clone())
        } else {
            burn::tensor::activation::gelu(x.clone())
        };
        let r = Tensor::<4>::ones(y.dims(), &y.device()) + y.clone().detach().sin();
        let grads = (y.clone() * r).sum().backward();
        (y, x.grad(&grads).expect("input gradient"))
    };
    for (name, x) in [("rank 4, transposed", x4), ("rank 2", x2.unsqueeze::<4>())] {
        let (y, dx) = run(x.clone(), true);
        let (y_ref, dx_ref) = run(x, false);
        assert_close(&format!("{name} output"), y.detach(), y_ref.detach());
        assert_close(&format!("{name} input gradient"), dx, dx_ref);
    }
    // Without autodiff (evaluation) the forward alone runs.
    let x = random([7, 9]).inner();
    let y = kernels::gelu(x.clone());
    assert_close(
        "inference output",
        y.unsqueeze::<4>(),
        burn::tensor::activation::gelu(x).unsqueeze::<4>(),
    );
}

#[test]
fn causal_attention_matches_burn_forward_and_gradient() {
    // Burn's own (the kernel's fallback): split the packed projections, its attention with a
    // causal mask, merge.
    let burn_attention = kernels::causal_attention_by_burn;
    // GPT's shape, an odd one, and a transposed (not contiguous) input.
    let inputs = [
        ("4 heads of 32", random([3, 64, 384]) * 2.0, 4),
        ("3 heads of 7", random([2, 13, 63]) * 4.0, 3),
        ("transposed", random([2, 42, 5]).swap_dims(1, 2) * 2.0, 2),
    ];
    for (name, x, heads) in inputs {
        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fast {
                kernels::causal_attention(x.clone(), heads)
            } else {
                burn_attention(x.clone(), heads)
            };
            let r = y.clone().detach().sin() + 0.5;
            let grads = (y.clone() * r).sum().backward();
            (y, x.grad(&grads).expect("input gradient"))
        };
        let (y, dx) = run(true);
        let (y_ref, dx_ref) = run(false);
        assert_close(&format!("{name} output"), y.detach(), y_ref.detach());
        assert_close(&format!("{name} input gradient"), dx, dx_ref);
    }
    // Without autodiff (evaluation) the forward alone runs.
    let x = random([2, 10, 24]).inner();
    assert_close(
        "inference output",
        kernels::causal_attention(x.clone(), 2),
        burn_attention(x, 2),
    );
}

#[test]
fn layer_norm_matches_burn_forward_and_gradients() {
    let mut ln = burn::nn::LayerNormConfig::new(37).init(&device());
    ln.gamma = Param::from_tensor(random([37]) * 0.5 + 1.0);
    ln.beta = Some(Param::from_tensor(random([37]) * 0.1));
    let x = (random([3, 70, 37]) * 2.0 + 3.0).detach();
    let run = |fast: bool| {
        let x = x.clone().require_grad();
        let y = if fast {
            kernels::layer_norm(&ln, x.clone(), 1e-5)
        } else {
            ln.forward(x.clone())
        };
        let r = y.clone().detach().cos();
        let grads = (y.clone() * r).sum().backward();
        let gamma = ln.gamma.grad(&grads).expect("gamma gradient");
        let beta = ln
            .beta
            .as_ref()
            .unwrap()
            .grad(&grads)
            .expect("beta gradient");
        (y, x.grad(&grads).expect("input gradient"), gamma, beta)
    };
    let (y, dx, dg, db) = run(true);
    let (y_ref, dx_ref, dg_ref, db_ref) = run(false);
    assert_close("output", y.detach(), y_ref.detach());
    assert_close("input gradient", dx, dx_ref);
    assert_close(
        "gamma gradient",
        dg.unsqueeze::<4>(),
        dg_ref.unsqueeze::<4>(),
    );
    assert_close(
        "beta gradient",
        db.unsqueeze::<4>(),
        db_ref.unsqueeze::<4>(),
    );
}

#[test]
fn reduce_grad_passes_values_and_transforms_the_gradient() {
    let x = random([3, 5]).require_grad();
    let w = random([3, 5]);
    let double = kernels::GradReduce(std::sync::Arc::new(|grad: &mut [f32]| {
        grad.iter_mut().for_each(|g| *g *= 2.0)
    }));
    let y = kernels::reduce_grad(x.clone(), double).expect("f32 on Flex");
    assert_close("value", y.clone().detach(), x.clone().detach());
    let grads = (y * w.clone()).sum().backward();
    assert_close("gradient", x.grad(&grads).unwrap(), w.inner() * 2.0);
}

/// Burn's backward runs steps deepest first, not as soon as a gradient is complete: a
/// `reduce_grad` on a parameter (depth 1) runs after the backward of every earlier layer, so
/// a data-parallel hook there could never overlap anything. `reduce_grad_at` with a deeper
/// clock runs right after the parameter's consumer, before the earlier layer's backward (the
/// marker on the activation between the layers), with the same gradient.
#[test]
fn reduce_grad_at_a_deep_clock_runs_before_the_earlier_layers_backward() {
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = |name: &'static str| {
        let events = std::sync::Arc::clone(&events);
        kernels::GradReduce(std::sync::Arc::new(move |_: &mut [f32]| {
            events.lock().unwrap().push(name)
        }))
    };
    let (x, w1, w2) = (random([4, 6]), random([6, 5]), random([5, 3]));
    let run = |clock: Option<&Tensor<1>>| {
        events.lock().unwrap().clear();
        let (w1, w2) = (w1.clone().require_grad(), w2.clone().require_grad());
        let hooked = match clock {
            Some(clock) => kernels::reduce_grad_at(w2.clone(), clock, record("w2")),
            None => kernels::reduce_grad(w2.clone(), record("w2")),
        };
        let h = kernels::reduce_grad(x.clone().matmul(w1.clone()), record("marker")).unwrap();
        let grads = h.matmul(hooked.expect("f32 on Flex")).sum().backward();
        let order = events.lock().unwrap().clone();
        (order, w2.grad(&grads).unwrap(), w1.grad(&grads).unwrap())
    };
    let (flat, flat_w2, flat_w1) = run(None);
    assert_eq!(
        flat,
        ["marker", "w2"],
        "Burn's order changed: depth 1 no longer runs last"
    );
    let clock = kernels::backward_clocks(&[6], &device()).remove(0);
    let (deep, deep_w2, deep_w1) = run(Some(&clock));
    assert_eq!(deep, ["w2", "marker"]);
    assert_close("w2 gradient", deep_w2, flat_w2);
    assert_close("w1 gradient", deep_w1, flat_w1);
}

#[test]
fn unsupported_layers_and_devices_fall_back_to_burn() {
    let grouped = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(2)
        .init(&device());
    let x = random([1, 4, 6, 6]);
    assert!(!kernels::conv2d_uses_kernels(&grouped, &x));
    assert_close(
        "grouped",
        kernels::conv2d(&grouped, x.clone()),
        grouped.forward(x.clone()),
    );
    let same = Conv2dConfig::new([4, 2], [2, 2])
        .with_padding(PaddingConfig2d::Same)
        .init(&device());
    assert!(!kernels::conv2d_uses_kernels(&same, &x));
    // A plain layer that would take the fast path on a right input: a channel mismatch and an
    // empty batch go to Burn, which reports them.
    let plain_conv = Conv2dConfig::new([4, 2], [3, 3]).init(&device());
    assert!(kernels::conv2d_uses_kernels(&plain_conv, &x));
    assert!(!kernels::conv2d_uses_kernels(
        &plain_conv,
        &random([1, 3, 6, 6])
    ));
    let empty = Tensor::<4>::zeros([0, 4, 6, 6], &device());
    assert!(!kernels::conv2d_uses_kernels(&plain_conv, &empty));
    let ceil = MaxPool2dConfig::new([2, 2]).with_ceil_mode(true).init();
    let odd = random([1, 1, 5, 5]);
    assert!(!kernels::max_pool2d_uses_kernels(&ceil, &odd));
    let plain = MaxPool2dConfig::new([2, 2]).init();
    assert!(!kernels::max_pool2d_uses_kernels(&plain, &empty));
    assert_eq!(kernels::max_pool2d(&ceil, odd).dims(), [1, 1, 3, 3]);
}

/// A training-mode batch norm with the given affine parameters and fresh running statistics.
fn batch_norm(gamma: &Tensor<1>, beta: &Tensor<1>) -> BatchNorm {
    let mut bn = BatchNormConfig::new(gamma.dims()[0]).init(&device());
    bn.gamma = Param::from_tensor(gamma.clone());
    bn.beta = Param::from_tensor(beta.clone());
    bn
}

#[test]
fn batch_norm_matches_burn_forward_gradients_and_running_statistics() {
    // (residual added, ReLU after): the plain batch norm, and ResNet's fused
    // relu(bn(x)) and relu(bn(x) + shortcut).
    let variants = [(false, false), (false, true), (true, true)];
    for shape in [[2, 3, 5, 7], [1, 4, 3, 3], [8, 16, 6, 6], [3, 2, 1, 1]] {
        for (with_residual, relu) in variants {
            let channels = shape[1];
            let x = (random(shape) * 3.0 + 1.0).detach();
            let shortcut = random(shape).detach();
            let gamma = random([channels]);
            let beta = random([channels]);
            let r = random(shape);
            let run = |fast: bool| {
                let bn = batch_norm(&gamma, &beta);
                let x = x.clone().require_grad();
                let shortcut = shortcut.clone().require_grad();
                assert!(kernels::batch_norm_uses_kernels(&bn, &x));
                // Two steps, so the running statistics are updated from non-initial values.
                let mut outputs = Vec::new();
                let mut grads = Vec::new();
                for step in 0..2 {
                    let xs = x.clone() + step as f32;
                    let residual = with_residual.then(|| shortcut.clone());
                    let y = if fast {
                        kernels::batch_norm_act(&bn, xs, residual, relu)
                    } else {
                        let mut y = bn.forward(xs);
                        if let Some(residual) = residual {
                            y = y + residual;
                        }
                        if relu {
                            y = burn::tensor::activation::relu(y);
                        }
                        y
                    };
                    let g = (y.clone() * r.clone()).sum().backward();
                    grads.push((
                        x.grad(&g).expect("input gradient"),
                        bn.gamma.grad(&g).expect("gamma gradient"),
                        bn.beta.grad(&g).expect("beta gradient"),
                        shortcut.grad(&g),
                    ));
                    outputs.push(y.detach());
                }
                let running = (bn.running_mean.value(), bn.running_var.value());
                (outputs, grads, running)
            };
            let (y, grads, (mean, var)) = run(true);
            let (y_ref, grads_ref, (mean_ref, var_ref)) = run(false);
            let name = format!("{shape:?}, residual {with_residual}, relu {relu}");
            for (a, b) in y.into_iter().zip(y_ref) {
                assert_close(&format!("{name} output"), a, b);
            }
            for ((dx, dg, db, ds), (dx_ref, dg_ref, db_ref, ds_ref)) in
                grads.into_iter().zip(grads_ref)
            {
                assert_close(&format!("{name} input gradient"), dx, dx_ref);
                assert_close(&format!("{name} gamma gradient"), dg, dg_ref);
                assert_close(&format!("{name} beta gradient"), db, db_ref);
                assert_eq!(ds.is_some(), with_residual, "{name}: residual gradient");
                if let (Some(ds), Some(ds_ref)) = (ds, ds_ref) {
                    assert_close(&format!("{name} residual gradient"), ds, ds_ref);
                }
            }
            assert_close(&format!("{name} running mean"), mean, mean_ref);
            assert_close(&format!("{name} running variance"), var, var_ref);
        }
    }
    // Frozen layers and inference devices go to Burn.
    let bn = batch_norm(&random([3]), &random([3]));
    let x = random([2, 3, 4, 4]);
    assert!(kernels::batch_norm_uses_kernels(&bn, &x));
    let plain = random([2, 3, 4, 4]).inner();
    assert!(!kernels::batch_norm_uses_kernels(&bn, &plain));
    let frozen = burn::module::Module::freeze(bn);
    assert!(!kernels::batch_norm_uses_kernels(&frozen, &x));
}

#[test]
fn check_device_compares_the_kernels_with_burns_ops_and_can_fail() {
    let output = crate::common::kiln_ok(&["check-device", "--json"]);
    let report = crate::common::last_json(&output);
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["reference"], "the CPU with Burn's ops");
    // Logits plus one gradient per parameter tensor: SimpleCNN has 8, ResNet-18 62.
    for (check, tensors) in [
        ("simple_cnn_train", 9),
        ("resnet18_train", 63),
        ("resnet18_eval", 1),
    ] {
        let c = &report["checks"][check];
        assert_eq!(c["tensors"], tensors, "{check}: {c}");
        assert!(c["max_diff"].as_f64().unwrap() <= 1e-4, "{check}: {c}");
    }
    // The kernels sum in another order than Burn's ops: a tolerance below that is a failure.
    let output = crate::common::kiln(&["check-device", "--tolerance", "1e-12"]);
    crate::common::assert_clean_failure(
        &output,
        &[
            "differs from the CPU with Burn's ops",
            "above the tolerance",
        ],
    );
}
