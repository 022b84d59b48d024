//! Quantized inference: SimpleCNN at batch 256 (samples/s) and batch 1 (latency) on MNIST
//! test images, float32 vs kiln's integer path (int8 weights per tensor, static activations
//! calibrated on 32 batches of 32 training images, and dynamic activations), next to PyTorch
//! float32, `quantize_dynamic` and x86 static int8 (benches/quantize_pytorch.py, 2 threads)
//! when PyTorch is installed. With `--resnet-reps N` (default 3; 0 skips it), ResNet-18 (10
//! classes) at batch 32 x 224 too: float32 vs the integer path (BatchNorm folded, static
//! activations calibrated on 4 batches of 8 random images), next to PyTorch's float32 and x86
//! static int8. Rounds alternate kiln and PyTorch so both see the same machine state; medians
//! over rounds. Prints one JSON object with the machine (CPU, ISA, int8 kernel).
//!
//! `cargo bench --bench quantize -- --rounds 3 --reps 20`

mod common;

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use kiln::models::quant::{Activations, Int8ResNet, Int8SimpleCnn, QuantScheme, save_quantized};
use kiln::models::{ResNet, ResNetDepth, SimpleCnn, SimpleCnnConfig, load_weights};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::{MnistDataset, MnistSplit, make_batch};
use serde_json::json;

use common::{arg, median, median_field, run_pytorch_with};

fn timed(model: &SimpleCnn, images: &Tensor<4>) -> f64 {
    let start = Instant::now();
    let _ = model.forward(images.clone()).into_data();
    start.elapsed().as_secs_f64()
}

/// ResNet-18 (10 classes) float32 and on the integer path, and a batch of 32 at 224.
fn resnet_models(device: &Device) -> (ResNet, Int8ResNet, Tensor<4>) {
    let float = ResNet::new(ResNetDepth::R18, 10, device);
    let random = |n: usize| Tensor::<4>::random([n, 3, 224, 224], Distribution::Default, device);
    let mut int8 = Int8ResNet::new(&float, Activations::Dynamic).expect("ResNet-18 runs int8");
    int8.calibrate((0..4).map(|_| random(8)));
    (float, int8, random(32))
}

/// Samples/s of `reps` ResNet passes at batch 32: float32, then the integer path.
fn resnet_rates(models: &(ResNet, Int8ResNet, Tensor<4>), reps: usize) -> (Vec<f64>, Vec<f64>) {
    let (float, int8, batch) = models;
    let (mut f, mut q) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let start = Instant::now();
        let _ = float.forward(batch.clone()).into_data();
        f.push(32.0 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let _ = int8.forward_tensor(batch.clone()).into_data();
        q.push(32.0 / start.elapsed().as_secs_f64());
    }
    (f, q)
}

fn main() {
    let rounds = arg("--rounds", 3);
    let reps = arg("--reps", 20);
    let latency_reps = arg("--latency-reps", 200);
    let resnet_reps = arg("--resnet-reps", 3);
    let device = Device::flex();
    let weights = format!(
        "{}/tests/data/simple_cnn/simple_cnn.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut float = SimpleCnnConfig::new().init(&device, 0);
    let _ = load_weights(&mut float, weights.as_ref()).expect("fixture weights load");
    let sizes = {
        let dir = std::env::temp_dir().join(format!("kiln-bench-quantize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let path = dir.join("simple-cnn-int8.safetensors");
        let sizes =
            save_quantized(&float, "simple-cnn", QuantScheme::INT8, &path).expect("quantize");
        let _ = std::fs::remove_dir_all(&dir);
        sizes
    };
    let pixels = |data: &MnistDataset, from: usize, n: usize| -> Vec<f32> {
        let idx: Vec<usize> = (from..from + n).collect();
        let images = make_batch(data, &idx, &device).images;
        images
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 images")
    };
    let train = MnistSource::Embedded
        .load(MnistSplit::Train)
        .expect("embedded MNIST");
    let test = MnistSource::Embedded
        .load(MnistSplit::Test)
        .expect("embedded MNIST");
    let mut int8 = Int8SimpleCnn::new(&float, QuantScheme::INT8, Activations::Dynamic)
        .expect("int8 per tensor runs on the integer path");
    let dynamic = int8.clone();
    int8.calibrate((0..32).map(|b| {
        let idx: Vec<usize> = (32 * b..32 * (b + 1)).collect();
        make_batch(&train, &idx, &device).images
    }));
    let (batch_px, one_px) = (pixels(&test, 0, 256), pixels(&test, 256, 1));
    let batch =
        Tensor::<4>::from_data(TensorData::new(batch_px.clone(), [256, 1, 28, 28]), &device);
    let one = Tensor::<4>::from_data(TensorData::new(one_px.clone(), [1, 1, 28, 28]), &device);
    let timed_int8 = |m: &Int8SimpleCnn, px: &[f32], n: usize| {
        let start = Instant::now();
        std::hint::black_box(m.forward(px, n));
        start.elapsed().as_secs_f64()
    };
    let _ = (timed(&float, &batch), timed_int8(&int8, &batch_px, 256));
    let resnet = (resnet_reps > 0).then(|| resnet_models(&device));
    if let Some(models) = &resnet {
        let _ = resnet_rates(models, 1);
    }
    let (mut rf, mut rq) = (Vec::new(), Vec::new());
    let mut qd = Vec::new();
    let (mut f, mut q, mut fl, mut ql) = (vec![], vec![], vec![], vec![]);
    let mut pytorch = Vec::new();
    for round in 0..rounds {
        for _ in 0..reps {
            f.push(256.0 / timed(&float, &batch));
            q.push(256.0 / timed_int8(&int8, &batch_px, 256));
            qd.push(256.0 / timed_int8(&dynamic, &batch_px, 256));
        }
        for _ in 0..latency_reps {
            fl.push(1e3 * timed(&float, &one));
            ql.push(1e3 * timed_int8(&int8, &one_px, 1));
        }
        if let Some(models) = &resnet {
            let (f, q) = resnet_rates(models, resnet_reps);
            rf.extend(f);
            rq.extend(q);
        }
        eprintln!("round {}/{rounds}: kiln done", round + 1);
        if let Some(p) = run_pytorch_with(
            "quantize_pytorch.py",
            &[
                "--reps",
                &reps.to_string(),
                "--latency-reps",
                &latency_reps.to_string(),
                "--resnet-reps",
                &resnet_reps.to_string(),
            ],
        ) {
            pytorch.push(p);
        }
    }
    let (f, q, fl, ql, qd) = (median(f), median(q), median(fl), median(ql), median(qd));
    let pt = |key: &str| median_field(&pytorch, key);
    let (pf, pq) = (pt("fp32_samples_per_sec"), pt("int8_samples_per_sec"));
    let ps = pt("static_samples_per_sec");
    let (rf, rq) = (
        (!rf.is_empty()).then(|| median(rf)),
        (!rq.is_empty()).then(|| median(rq)),
    );
    let (prf, prs) = (
        pt("resnet_fp32_samples_per_sec"),
        pt("resnet_static_samples_per_sec"),
    );
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    println!(
        "{}",
        json!({
            "machine": common::machine(),
            "batch_size": 256,
            "rounds": rounds,
            "reps_per_round": reps,
            "fp32_bytes": sizes.float_bytes,
            "int8_bytes": sizes.quantized_bytes,
            "kiln": {
                "fp32_samples_per_sec": f,
                "int8_samples_per_sec": q,
                "int8_dynamic_samples_per_sec": qd,
                "fp32_latency_ms": fl,
                "int8_latency_ms": ql,
            },
            "pytorch": (!pytorch.is_empty()).then(|| json!({
                "fp32_samples_per_sec": pf,
                "int8_samples_per_sec": pq,
                "fp32_latency_ms": pt("fp32_latency_ms"),
                "int8_latency_ms": pt("int8_latency_ms"),
                "x86_static_int8_samples_per_sec": ps,
                "x86_static_int8_latency_ms": pt("static_latency_ms"),
            })),
            "resnet18_b32_224": resnet.is_some().then(|| json!({
                "kiln_fp32_samples_per_sec": rf,
                "kiln_int8_samples_per_sec": rq,
                "pytorch_fp32_samples_per_sec": prf,
                "pytorch_x86_static_int8_samples_per_sec": prs,
                "kiln_int8_over_kiln_fp32": ratio(rq, rf),
                "kiln_int8_over_pytorch_x86_static": ratio(rq, prs),
            })),
            "ratios": {
                "kiln_int8_over_kiln_fp32": q / f,
                "kiln_int8_over_pytorch_fp32": pf.map(|p| q / p),
                "kiln_int8_over_pytorch_int8": pq.map(|p| q / p),
                "kiln_int8_over_pytorch_x86_static": ps.map(|p| q / p),
            },
        })
    );
}
