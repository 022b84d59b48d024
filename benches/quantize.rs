//! Quantized inference: SimpleCNN at batch 256 (samples/s) and batch 1 (latency), float32 vs
//! the int8 file kiln writes (loaded back), next to PyTorch float32 and `quantize_dynamic`
//! int8 (benches/quantize_pytorch.py, 2 threads) when PyTorch is installed. Rounds alternate
//! kiln and PyTorch so both see the same machine state; medians over rounds. Prints one JSON
//! object.
//!
//! `cargo bench --bench quantize -- --rounds 3 --reps 20`

mod common;

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use kiln::models::quant::{QuantScheme, load_quantized, save_quantized};
use kiln::models::{SimpleCnn, SimpleCnnConfig, load_weights};
use serde_json::json;

use common::{arg, median, median_field, run_pytorch_with};

fn timed(model: &SimpleCnn, images: &Tensor<4>) -> f64 {
    let start = Instant::now();
    let _ = model.forward(images.clone()).into_data();
    start.elapsed().as_secs_f64()
}

fn main() {
    let rounds = arg("--rounds", 3);
    let reps = arg("--reps", 20);
    let latency_reps = arg("--latency-reps", 200);
    let device = Device::flex();
    let weights = format!(
        "{}/tests/data/simple_cnn/simple_cnn.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut float = SimpleCnnConfig::new().init(&device, 0);
    let _ = load_weights(&mut float, weights.as_ref()).expect("fixture weights load");
    let dir = std::env::temp_dir().join(format!("kiln-bench-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let path = dir.join("simple-cnn-int8.safetensors");
    let sizes = save_quantized(&float, "simple-cnn", QuantScheme::INT8, &path).expect("quantize");
    let mut int8 = SimpleCnnConfig::new().init(&device, 1);
    let _ = load_quantized(&mut int8, &path).expect("quantized file loads");
    let _ = std::fs::remove_dir_all(&dir);

    let batch = Tensor::<4>::random([256, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let one = Tensor::<4>::random([1, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let _ = (timed(&float, &batch), timed(&int8, &batch));
    let (mut f, mut q, mut fl, mut ql) = (vec![], vec![], vec![], vec![]);
    let mut pytorch = Vec::new();
    for round in 0..rounds {
        for _ in 0..reps {
            f.push(256.0 / timed(&float, &batch));
            q.push(256.0 / timed(&int8, &batch));
        }
        for _ in 0..latency_reps {
            fl.push(1e3 * timed(&float, &one));
            ql.push(1e3 * timed(&int8, &one));
        }
        eprintln!("round {}/{rounds}: kiln done", round + 1);
        if let Some(p) = run_pytorch_with(
            "quantize_pytorch.py",
            &[
                "--reps",
                &reps.to_string(),
                "--latency-reps",
                &latency_reps.to_string(),
            ],
        ) {
            pytorch.push(p);
        }
    }
    let (f, q, fl, ql) = (median(f), median(q), median(fl), median(ql));
    let pt = |key: &str| median_field(&pytorch, key);
    let (pf, pq) = (pt("fp32_samples_per_sec"), pt("int8_samples_per_sec"));
    println!(
        "{}",
        json!({
            "batch_size": 256,
            "rounds": rounds,
            "reps_per_round": reps,
            "fp32_bytes": sizes.float_bytes,
            "int8_bytes": sizes.quantized_bytes,
            "kiln": {
                "fp32_samples_per_sec": f,
                "int8_samples_per_sec": q,
                "fp32_latency_ms": fl,
                "int8_latency_ms": ql,
            },
            "pytorch": (!pytorch.is_empty()).then(|| json!({
                "fp32_samples_per_sec": pf,
                "int8_samples_per_sec": pq,
                "fp32_latency_ms": pt("fp32_latency_ms"),
                "int8_latency_ms": pt("int8_latency_ms"),
            })),
            "ratios": {
                "kiln_int8_over_kiln_fp32": q / f,
                "kiln_int8_over_pytorch_fp32": pf.map(|p| q / p),
                "kiln_int8_over_pytorch_int8": pq.map(|p| q / p),
            },
        })
    );
}
