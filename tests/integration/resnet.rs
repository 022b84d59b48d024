//! torchvision ResNet-18 weights exported by PyTorch, run through `kiln predict`: the logits
//! match PyTorch's, and bad files, the wrong model and the wrong class count are clear errors;
//! `kiln bench resnet18` reports its throughput.

use std::path::{Path, PathBuf};

use crate::common::{
    assert_clean_failure, fixture, kiln, kiln_ok, max_abs_diff, npy, repo, resnet18_weights,
};

fn resnet_fixture(name: &str) -> PathBuf {
    repo("tests/data/resnet18").join(name)
}

fn predict(weights: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let input = resnet_fixture("input.npy");
    let args = [
        &[
            "predict",
            "--model",
            "resnet18",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ][..],
        extra,
    ]
    .concat();
    kiln(&args)
}

#[test]
fn resnet18_logits_match_pytorch_from_pth_and_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let expected = npy(&resnet_fixture("logits.npy"));
    for ext in ["pth", "safetensors"] {
        let out = dir.path().join(format!("logits-{ext}.npy"));
        let output = predict(&resnet18_weights(dir.path(), ext), &out, &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let logits = npy(&out);
        assert_eq!(logits.shape, expected.shape);
        let diff = max_abs_diff(&logits.values, &expected.values);
        eprintln!("resnet18 from .{ext}: max |delta logit| = {diff:e}");
        assert!(diff < 1e-4, ".{ext}: {diff}");
    }
}

#[test]
fn bad_resnet_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.npy");
    let good = resnet18_weights(dir.path(), "safetensors");

    // The wrong class count: the fc layer's shape is named.
    let output = predict(&good, &out, &["--num-classes", "10"]);
    assert_clean_failure(&output, &["fc.weight", "[512, 10]", "[512, 1000]"]);

    // A truncated file.
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    assert_clean_failure(&predict(&truncated, &out, &[]), &["truncated.safetensors"]);

    // The wrong model: SimpleCNN weights are not a ResNet.
    let simple = fixture("simple_cnn.safetensors");
    assert_clean_failure(
        &predict(&simple, &out, &[]),
        &[
            "do not match the model",
            "conv1.weight",
            "missing from the file",
            "more",
        ],
    );

    // An MNIST-shaped input is refused with the shape ResNet takes.
    let mnist_input = fixture("input.npy");
    let output = kiln(&[
        "predict",
        "--model",
        "resnet18",
        "--weights",
        good.to_str().unwrap(),
        "--input",
        mnist_input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["3, H, W"]);
    assert!(!out.exists(), "no output is written on failure");
}

#[test]
fn bench_reports_samples_per_second_as_json() {
    let output = kiln_ok(&[
        "bench",
        "resnet18",
        "--only",
        "train_b32_32",
        "--rounds",
        "1",
        "--reps",
        "1",
        "--json",
    ]);
    let report = crate::common::last_json(&output);
    assert!(
        report["kiln"]["train_b32_32"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["kiln"].get("train_b8_224").is_none(), "{report}");
    assert!(report["pytorch"].is_null(), "{report}");
    let output = kiln(&["bench", "resnet18", "--pytorch", "/nonexistent/twin.py"]);
    assert_clean_failure(&output, &["--pytorch /nonexistent/twin.py: no such file"]);
}

/// ResNet-18 (the fixture's weights, real BatchNorm statistics) on the integer path: every
/// convolution with its BatchNorm folded in, int8 weights per channel, 7-bit activations.
/// Its logits follow the float model's, dynamic and calibrated, on the fixture's two images and
/// six seeded ones.
#[test]
fn resnet18_runs_on_the_integer_path_close_to_float() {
    use burn::tensor::{Device, Tensor, TensorData};
    use kiln::models::quant::{Activations, Int8ResNet};
    use kiln::models::{ResNet, ResNetDepth, load_weights};

    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let mut model = ResNet::new(ResNetDepth::R18, 1000, &device);
    let _ = load_weights(&mut model, &resnet18_weights(dir.path(), "safetensors")).unwrap();
    let fixture = npy(&resnet_fixture("input.npy"));
    let mut pixels = fixture.values.clone();
    let mut s = 17u32;
    pixels.extend((0..6 * 3 * 64 * 64).map(|_| {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        ((s >> 8) % 2001) as f32 / 1000.0 - 1.0
    }));
    let images = Tensor::<4>::from_data(TensorData::new(pixels, [8, 3, 64, 64]), &device);
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    let float = values(model.forward(images.clone()));
    let top = |r: &[f32]| (0..r.len()).fold(0, |m, i| if r[i] > r[m] { i } else { m });
    let scale = float.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut int8 = Int8ResNet::new(&model, Activations::Dynamic).expect("ResNet-18 runs int8");
    for mode in ["dynamic", "static"] {
        if mode == "static" {
            int8.calibrate(images.clone().chunk(4, 0));
        }
        let got = values(int8.forward_tensor(images.clone()));
        let rel = max_abs_diff(&got, &float) / scale;
        let agree = got
            .chunks(1000)
            .zip(float.chunks(1000))
            .filter(|(a, b)| top(a) == top(b))
            .count();
        eprintln!(
            "ResNet-18 int8 ({mode}): max |delta logit| / max |logit| = {rel:e}, top-1 {agree}/8"
        );
        assert!(rel < 0.1, "{mode}: {rel}");
        assert!(agree >= 7, "{mode}: top-1 agrees on {agree} of 8");
    }
    assert!(matches!(
        int8.activations(),
        Activations::Static { batches: 4, .. }
    ));
}

/// ResNet-50's bottleneck blocks (1x1, strided 3x3, 1x1 and a projection) on the integer path
/// too: a freshly initialised model (BatchNorm statistics at their defaults) follows its float
/// logits on seeded images.
#[test]
fn resnet50_bottlenecks_run_on_the_integer_path_close_to_float() {
    use burn::tensor::{Device, Tensor, TensorData};
    use kiln::models::quant::{Activations, Int8ResNet};
    use kiln::models::{ResNet, ResNetDepth};

    let device = Device::flex();
    let model = ResNet::new(ResNetDepth::R50, 10, &device);
    let mut s = 5u32;
    let pixels: Vec<f32> = (0..4 * 3 * 64 * 64)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let images = Tensor::<4>::from_data(TensorData::new(pixels, [4, 3, 64, 64]), &device);
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    let float = values(model.forward(images.clone()));
    let int8 = Int8ResNet::new(&model, Activations::Dynamic).expect("ResNet-50 runs int8");
    let got = values(int8.forward_tensor(images));
    let scale = float.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let rel = max_abs_diff(&got, &float) / scale;
    eprintln!("ResNet-50 int8 (dynamic): max |delta logit| / max |logit| = {rel:e}");
    assert!(rel < 0.1, "{rel}");
}
