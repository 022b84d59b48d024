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
