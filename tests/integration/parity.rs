//! SimpleCNN against PyTorch 2.15: fixtures from tests/data/simple_cnn/generate.py
//! (torch.manual_seed(0), 64 MNIST test digits). Tolerance 1e-4 absolute on logits.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use kiln::models::{SimpleCnn, SimpleCnnConfig, load_weights};
use kiln::trainer::report::Verbosity;
use kiln::trainer::{Execution, OptimizerConfig, RunLabels, TrainData, Trainer, TrainerConfig};

use crate::common::{
    ArrayDataset, assert_clean_failure, fixture, gunzip, kiln, kiln_ok, last_json, max_abs_diff,
    npy, repo,
};

const TOLERANCE: f32 = 1e-4;

#[test]
fn predict_matches_pytorch_logits_for_pth_and_safetensors() {
    let expected = npy(&fixture("logits.npy"));
    let dir = tempfile::tempdir().unwrap();
    for weights in ["simple_cnn.pth", "simple_cnn.safetensors"] {
        let out = dir.path().join(format!("{weights}.npy"));
        let output = kiln_ok(&[
            "predict",
            "--model",
            "simple-cnn",
            "--weights",
            fixture(weights).to_str().unwrap(),
            "--input",
            fixture("input.npy").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(last_json(&output)["samples"], 64);
        let logits = npy(&out);
        assert_eq!(logits.shape, vec![64, 10]);
        let diff = max_abs_diff(&logits.values, &expected.values);
        assert!(diff < TOLERANCE, "{weights}: max abs diff {diff}");
    }
}

#[test]
fn three_sgd_momentum_steps_match_pytorch() {
    let device = Device::flex().autodiff();
    let mut model = SimpleCnnConfig::new().init(&device, 123);
    let _report = load_weights(&mut model, &fixture("simple_cnn.pth")).unwrap();
    let input = npy(&fixture("input.npy"));
    let labels = npy(&fixture("train_labels.npy"));
    let data = ArrayDataset {
        pixels: input.values.clone(),
        labels: labels.values.iter().map(|&l| l as usize).collect(),
        shape: [1, 28, 28],
    };
    // One batch holding all 64 samples per epoch, so 3 epochs are PyTorch's 3 steps on that
    // batch (the per-epoch shuffle only reorders the terms of the mean loss).
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 64,
        eval_batch_size: 64,
        lr: 0.01,
        optimizer: OptimizerConfig::sgd(0.9),
        seed: 5,
        ..TrainerConfig::default()
    };
    let run = tempfile::tempdir().unwrap();
    let labels = RunLabels {
        recipe: "parity".into(),
        model: "simple-cnn".into(),
        quantization: None,
        options: Default::default(),
    };
    let trainer = Trainer::new(config, run.path(), labels)
        .unwrap()
        .with_verbosity(Verbosity::Quiet);
    let data = TrainData {
        train: &data,
        test: &data,
    };
    let (model, report) = trainer
        .fit(
            model,
            SimpleCnn::forward,
            data,
            None,
            &Execution::Single(device.clone()),
        )
        .unwrap();
    assert_eq!(report.history.last().unwrap().step, 3);

    let plain = Device::flex();
    let images = Tensor::<4>::from_data(TensorData::new(input.values, [64, 1, 28, 28]), &plain);
    let logits = model
        .valid()
        .forward(images)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let expected = npy(&fixture("logits_after_steps.npy"));
    let diff = max_abs_diff(&logits, &expected.values);
    assert!(diff < TOLERANCE, "max abs diff after 3 steps {diff}");
}

#[test]
fn weights_of_another_shape_or_format_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("input.npy");
    let out = dir.path().join("o.npy");
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"definitely not a pickle").unwrap();
    let unknown = dir.path().join("weights.bin");
    std::fs::write(&unknown, b"x").unwrap();
    for (weights, needle) in [
        (garbage.to_str().unwrap(), "garbage.pth"),
        (
            unknown.to_str().unwrap(),
            "expected a .pth, .pt or .safetensors file",
        ),
        ("/nonexistent/w.safetensors", "no such file"),
    ] {
        let output = kiln(&[
            "predict",
            "--model",
            "simple-cnn",
            "--weights",
            weights,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&output, &[needle]);
    }
    assert!(!out.exists(), "no output is written on failure");
}

/// Runs `kiln eval` on PyTorch `weights` (over `data`, or the embedded set) and checks the
/// test loss and accuracy against what PyTorch computed for the same weights.
fn check_eval_matches_pytorch(weights: &str, data: Option<&std::path::Path>) {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("eval_test_split.json")).unwrap()).unwrap();
    let weights_path = fixture(weights);
    let mut args = vec![
        "eval",
        "--model",
        "simple-cnn",
        "--weights",
        weights_path.to_str().unwrap(),
        "--json",
    ];
    if let Some(dir) = data {
        args.extend(["--data", dir.to_str().unwrap()]);
    }
    let output = kiln_ok(&args);
    let report = last_json(&output);
    assert_eq!(report["samples"], expected["samples"]);
    assert_eq!(
        report["test_accuracy"], expected["test_accuracy"],
        "{weights}"
    );
    let gap =
        (report["test_loss"].as_f64().unwrap() - expected["test_loss"].as_f64().unwrap()).abs();
    assert!(
        gap < 1e-4,
        "{weights}: test loss differs from PyTorch's by {gap}"
    );
}

#[test]
fn eval_of_pytorch_weights_matches_pytorch_on_the_test_split() {
    check_eval_matches_pytorch("simple_cnn.pth", None);
    check_eval_matches_pytorch("simple_cnn.safetensors", None);
}

#[test]
fn data_dir_of_raw_idx_files_evaluates_like_the_embedded_set() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let gz = std::fs::read(repo("data/mnist").join(format!("{name}.gz"))).unwrap();
        std::fs::write(dir.path().join(name), gunzip(&gz)).unwrap();
    }
    check_eval_matches_pytorch("simple_cnn.pth", Some(dir.path()));
}
