//! Where SimpleCNN's training step spends its time on Flex: each layer's forward and
//! forward+backward at the shapes of a batch of 64, timed alone (median of repetitions, after
//! a warm-up), with kiln's CPU kernels (`kiln`) and with Burn's own ops (`burn`). The
//! forward+backward figure includes the `sum` loss and its backward, and the input gradient even
//! for conv1 (training skips it there). Prints one JSON object; the PyTorch profile to compare
//! with (DESIGN.md, issue 9) puts convolution backward at 33 %, max-pool 25 %, convolution
//! forward 17 %, matmul 8 %.
//!
//! Run: `cargo bench --bench simple_cnn_ops` (`RAYON_NUM_THREADS=1` for one thread).

mod common;

use std::time::Instant;

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Distribution, Tensor};
use serde_json::{Map, Value, json};

const REPS: usize = 15;

/// Median wall time in milliseconds of `f`, after one warm-up call.
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..REPS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPS / 2]
}

/// Forward, then forward + backward (sum of the output as the loss), of `layer` on `input`.
fn measure<M: Module>(
    layer: &M,
    forward: impl Fn(&M, Tensor<4>) -> Tensor<4>,
    input: &Tensor<4>,
) -> (f64, f64) {
    let fwd = time_ms(|| {
        let _ = forward(layer, input.clone()).into_data();
    });
    let both = time_ms(|| {
        let x = input.clone().require_grad();
        let grads = forward(layer, x.clone()).sum().backward();
        let _ = x.grad(&grads).map(|g| g.into_data());
    });
    (fwd, both)
}

/// The threads Burn's and kiln's kernels run on (rayon's pool: `RAYON_NUM_THREADS` or the cores).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn main() {
    let device = Device::flex().autodiff();
    let batch = 64;
    let random =
        |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let pad = PaddingConfig2d::Explicit(1, 1, 1, 1);
    let conv1 = Conv2dConfig::new([1, 32], [3, 3])
        .with_padding(pad.clone())
        .init(&device);
    let conv2 = Conv2dConfig::new([32, 64], [3, 3])
        .with_padding(pad)
        .init(&device);
    let pool = MaxPool2dConfig::new([2, 2]).init();
    let relu = Relu::new();
    let fc1 = LinearConfig::new(3136, 128).init(&device);

    let mut ops = Map::new();
    let mut record = |name: &str, measure: &dyn Fn() -> (f64, f64)| {
        let mut modes = Map::new();
        for (mode, on) in [("kiln", true), ("burn", false)] {
            kiln::kernels::set_enabled(on);
            let (fwd, both) = measure();
            modes.insert(
                mode.into(),
                json!({ "forward_ms": fwd, "forward_backward_ms": both }),
            );
        }
        kiln::kernels::set_enabled(true);
        ops.insert(name.into(), Value::Object(modes));
    };
    let x = random([batch, 1, 28, 28]);
    record("conv1 [64,1,28,28]->[64,32,28,28]", &|| {
        measure(&conv1, kiln::kernels::conv2d, &x)
    });
    let x = random([batch, 32, 28, 28]);
    record("relu [64,32,28,28]", &|| {
        measure(&relu, |m, x| m.forward(x), &x)
    });
    record("maxpool [64,32,28,28]", &|| {
        measure(&pool, kiln::kernels::max_pool2d, &x)
    });
    let x = random([batch, 32, 14, 14]);
    record("conv2 [64,32,14,14]->[64,64,14,14]", &|| {
        measure(&conv2, kiln::kernels::conv2d, &x)
    });
    let x = random([batch, 64, 14, 14]);
    record("relu [64,64,14,14]", &|| {
        measure(&relu, |m, x| m.forward(x), &x)
    });
    record("maxpool [64,64,14,14]", &|| {
        measure(&pool, kiln::kernels::max_pool2d, &x)
    });
    let fc_input = random([batch, 1, 1, 3136]);
    record("fc1 [64,3136]->[64,128]", &|| {
        measure(
            &fc1,
            |m, x| {
                m.forward(x.reshape([batch, 3136]))
                    .reshape([batch, 1, 1, 128])
            },
            &fc_input,
        )
    });
    let total = |mode: &str| -> f64 {
        ops.values()
            .filter_map(|v| v[mode]["forward_backward_ms"].as_f64())
            .sum()
    };
    let total = json!({ "kiln": total("kiln"), "burn": total("burn") });
    let report: Value = json!({
        "benchmark": "simple_cnn_ops",
        "machine": common::machine(),
        "batch": batch,
        "reps": REPS,
        "threads": rayon_threads(),
        "ops": ops,
        "sum_forward_backward_ms": total,
    });
    println!("{report}");
}
