//! kiln's convolution kernels alone, on slices, at ResNet-18's stride-1 3x3 shapes (batch 8 at
//! 224x224 and batch 32 at 32x32 input), its other convolutions at batch 32 x 32x32 (stem,
//! stride-2 and 1x1 projections) and SimpleCNN's second convolution (batch 64): forward, input
//! gradient and weight gradient as kiln
//! runs them (Winograd where `winograd` is true) and with im2col + GEMM, interleaved rep by rep;
//! medians in milliseconds. Prints one JSON object.
//!
//! Run: `cargo bench --bench conv_kernels` (options: `-- --reps N`; `RAYON_NUM_THREADS=1` for
//! one thread).

mod common;

use std::time::Instant;

use common::{arg, median};
use kiln::kernels::conv::{
    Conv2dShape, conv2d_backward_input, conv2d_backward_weight, conv2d_forward,
};
use kiln::kernels::winograd::{self, Pass};
use serde_json::{Value, json};

fn values(len: usize, seed: u32) -> Vec<f32> {
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

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let reps = arg("--reps", 5);
    let mut rows: Vec<Value> = Vec::new();
    // (batch, input size, channels in, channels out, kernel, stride); padding kernel / 2.
    for (batch, size, channels_in, channels, k, stride) in [
        (8, 56, 64, 64, 3, 1),
        (8, 28, 128, 128, 3, 1),
        (8, 14, 256, 256, 3, 1),
        (8, 7, 512, 512, 3, 1),
        (32, 8, 64, 64, 3, 1),
        (32, 4, 128, 128, 3, 1),
        (32, 2, 256, 256, 3, 1),
        (32, 1, 512, 512, 3, 1),
        // The rest of ResNet-18 at batch 32 x 32x32: the stem, each stage's first (stride-2)
        // convolution and its 1x1 projection.
        (32, 32, 3, 64, 7, 2),
        (32, 8, 64, 128, 3, 2),
        (32, 8, 64, 128, 1, 2),
        (32, 4, 128, 256, 3, 2),
        (32, 2, 256, 512, 3, 2),
        // SimpleCNN's conv2 at batch 64.
        (64, 14, 32, 64, 3, 1),
    ] {
        let s = Conv2dShape {
            batch,
            channels_in,
            height: size,
            width: size,
            channels_out: channels,
            kernel: [k, k],
            stride: [stride, stride],
            padding: [k / 2, k / 2],
        };
        let x = values(batch * s.input_sample(), 1);
        let w = values(s.weight_len(), 2);
        let g = values(batch * s.output_sample(), 3);
        // [Winograd where it applies, im2col] x [forward, input gradient, weight gradient].
        let mut times: [[Vec<f64>; 3]; 2] = Default::default();
        for rep in 0..=reps {
            for (mode, on) in [true, false].into_iter().enumerate() {
                winograd::set_enabled(on);
                let mut out = vec![0.0; g.len()];
                let f = time(|| conv2d_forward(&s, &x, &w, None, &mut out));
                let mut dx = vec![0.0; x.len()];
                let b = time(|| conv2d_backward_input(&s, &w, &g, &mut dx));
                let mut dw = vec![0.0; w.len()];
                let d = time(|| conv2d_backward_weight(&s, &x, &g, &mut dw, None));
                if rep > 0 {
                    for (list, t) in times[mode].iter_mut().zip([f, b, d]) {
                        list.push(t);
                    }
                }
            }
        }
        winograd::set_enabled(true);
        let applies = [Pass::Forward, Pass::InputGradient, Pass::WeightGradient]
            .map(|pass| winograd::applies(&s, pass));
        let [[wf, wb, wd], [f, b, d]] = times.map(|m| m.map(median));
        let pass = |w: f64, i: f64| json!({ "kiln": w, "im2col": i, "speedup": i / w });
        rows.push(json!({
            "batch": batch, "size": size, "channels_in": channels_in, "channels": channels,
            "kernel": k, "stride": stride,
            "winograd": applies,
            "forward_ms": pass(wf, f),
            "input_grad_ms": pass(wb, b),
            "weight_grad_ms": pass(wd, d),
        }));
    }
    println!(
        "{}",
        json!({ "benchmark": "conv_kernels", "machine": common::machine(), "reps": reps, "shapes": rows })
    );
}
