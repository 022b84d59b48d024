//! `kiln quantize`, quantized files in `kiln eval`/`kiln predict`, and quantization-aware
//! training (`kiln train --qat`).

use crate::common::{
    assert_clean_failure, eval_json, fixture, kiln, kiln_ok, last_json, max_abs_diff, npy,
    quantize_json, train_cnn_mnist,
};

/// Quantizes the PyTorch fixture weights with `granularity` into `out` and returns the logits
/// `kiln predict` gives on the fixture input from the quantized file.
fn quantized_logits(granularity: &str, dir: &std::path::Path) -> Vec<f32> {
    let out = dir.join(format!("q-{granularity}.safetensors"));
    let weights = fixture("simple_cnn.safetensors");
    let report = last_json(&kiln_ok(&[
        "quantize",
        "--model",
        "simple-cnn",
        "--weights",
        weights.to_str().unwrap(),
        "--granularity",
        granularity,
        "--activations",
        "float",
        "--out",
        out.to_str().unwrap(),
        "--timing-batches",
        "1",
        "--json",
    ]));
    assert_eq!(report["scheme"], format!("int8:{granularity}"));
    assert_eq!(report["inference"], "float32");
    let logits = dir.join(format!("logits-{granularity}.npy"));
    kiln_ok(&[
        "predict",
        "--checkpoint",
        out.to_str().unwrap(),
        "--input",
        fixture("input.npy").to_str().unwrap(),
        "--output",
        logits.to_str().unwrap(),
    ]);
    npy(&logits).values
}

/// PyTorch's own quantizers (quantize_per_tensor / quantize_per_channel, qint8, symmetric)
/// applied to the same weights give the same model: tests/data/simple_cnn/quantized.py
/// (weight-only files, `--activations float`, which run in float32).
#[test]
fn int8_files_match_pytorch_quantizers() {
    let dir = tempfile::tempdir().unwrap();
    let float = npy(&fixture("logits.npy")).values;
    for granularity in ["tensor", "channel"] {
        let ours = quantized_logits(granularity, dir.path());
        let pytorch = npy(&fixture(&format!("logits_int8_{granularity}.npy"))).values;
        let diff = max_abs_diff(&ours, &pytorch);
        assert!(
            diff < 1e-4,
            "{granularity}: {diff} from PyTorch's quantized logits"
        );
        // The rounding is visible: the float model is farther away than the tolerance.
        let moved = max_abs_diff(&ours, &float);
        assert!(
            moved > 5e-4,
            "{granularity}: quantization moved logits by only {moved}"
        );
    }
}

#[test]
fn quantized_checkpoint_reports_sizes_and_evaluates_the_same_after_reload() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_cnn_mnist("512", &run, "1", &[]);
    let report = quantize_json(&run, "2", &[]);
    let out = run.join("simple-cnn-int8-tensor.safetensors");
    assert_eq!(report["output"], out.to_str().unwrap());
    let quantized_bytes = report["quantized_bytes"].as_u64().unwrap();
    assert_eq!(quantized_bytes, std::fs::metadata(&out).unwrap().len());
    let ratio = report["size_ratio"].as_f64().unwrap();
    assert!(ratio <= 0.30, "int8 file is {ratio} of the float file");
    for key in [
        "fp32_accuracy",
        "quantized_accuracy",
        "argmax_agreement",
        "fp32_samples_per_sec",
        "quantized_samples_per_sec",
        "fp32_latency_ms",
        "quantized_latency_ms",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    // kiln eval reads the file back with the accuracy the report measured.
    let eval = eval_json(&out);
    assert_eq!(eval["test_accuracy"], report["quantized_accuracy"]);
    assert_eq!(eval["quantization"], "int8:tensor");

    // Quantizing again replaces the earlier file; quantizing the quantized file, writing
    // over the checkpoint, or reading a truncated file are clean errors.
    kiln_ok(&[
        "quantize",
        "--checkpoint",
        run.to_str().unwrap(),
        "--timing-batches",
        "1",
    ]);
    let output = kiln(&["quantize", "--checkpoint", out.to_str().unwrap()]);
    assert_clean_failure(&output, &["already quantized"]);
    let checkpoint = run.join("checkpoints/epoch-0001.ckpt");
    let output = kiln(&[
        "quantize",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        checkpoint.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["--out", "is the model being quantized"]);
    let bytes = std::fs::read(&out).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let output = kiln(&["eval", "--checkpoint", truncated.to_str().unwrap()]);
    assert_clean_failure(&output, &["truncated.safetensors"]);
    // A bad flag value is a usage error (clap's exit status 2) naming the value.
    let output = kiln(&[
        "quantize",
        "--checkpoint",
        run.to_str().unwrap(),
        "--granularity",
        "block:0",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("block size \"0\""), "{stderr}");
}

/// Training with --qat evaluates the fake-quantized model every epoch; the converted file holds
/// exactly those weights, so its accuracy is the one training reported, and resuming keeps
/// the scheme.
#[test]
fn quantization_aware_training_converts_to_the_model_it_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("qat");
    let trained = train_cnn_mnist(
        "512",
        &run,
        "1",
        &["--qat", "int4", "--qat-granularity", "block:32"],
    );
    assert_eq!(trained["qat"], "int4:block:32");
    let report = quantize_json(&run, "1", &[]);
    assert_eq!(report["scheme"], "int4:block:32");
    assert_eq!(report["quantization_aware"], "int4:block:32");
    assert_eq!(report["quantized_accuracy"], trained["test_accuracy"]);
    let eval = eval_json(&run);
    assert_eq!(eval["test_accuracy"], trained["test_accuracy"]);

    // Resuming without --qat continues quantization-aware; a float run refuses --qat.
    let resumed = last_json(&kiln_ok(&[
        "train",
        "cnn-mnist",
        "--resume",
        run.to_str().unwrap(),
        "--limit",
        "512",
        "--epochs",
        "2",
        "--json",
        "-q",
    ]));
    assert_eq!(resumed["qat"], "int4:block:32");
    let float = dir.path().join("float");
    train_cnn_mnist("256", &float, "1", &[]);
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--resume",
        float.to_str().unwrap(),
        "--limit",
        "256",
        "--epochs",
        "2",
        "--qat",
        "int8",
        "-q",
    ]);
    assert_clean_failure(
        &output,
        &[
            "float training",
            "quantization-aware training (int8:tensor)",
        ],
    );
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--pipeline-stages",
        "2",
        "--qat",
        "int8",
        "--limit",
        "256",
        "--out",
        dir.path().join("p").to_str().unwrap(),
        "-q",
    ]);
    assert_clean_failure(&output, &["--qat", "pipeline"]);
}

/// The integer path: a trained cnn-mnist quantized with static and with dynamic activations
/// loses at most 0.3 points of test accuracy, agrees with the float model on >= 99 % of the
/// argmaxes, says it ran the int8 GEMM, and `kiln eval` of the file gives the accuracy
/// `kiln quantize` reported (exactly with static scales; dynamic ones follow the batch).
#[test]
fn int8_files_run_on_the_integer_path_within_the_accuracy_budget() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_cnn_mnist("1024", &run, "2", &[]);
    for mode in ["static", "dynamic"] {
        let out = run.join(format!("int8-{mode}.safetensors"));
        let report = quantize_json(
            &run,
            "1",
            &["--activations", mode, "--out", out.to_str().unwrap()],
        );
        let inference = report["inference"].as_str().unwrap();
        assert!(
            inference.starts_with("int8 (u8 x i8 GEMM") && inference.contains(mode),
            "{inference}"
        );
        let float = report["fp32_accuracy"].as_f64().unwrap();
        let int8 = report["quantized_accuracy"].as_f64().unwrap();
        assert!(int8 >= float - 0.003, "{mode}: {float} -> {int8}");
        assert!(report["argmax_agreement"].as_f64().unwrap() >= 0.99);
        let eval = eval_json(&out);
        let evaluated = eval["test_accuracy"].as_f64().unwrap();
        if mode == "static" {
            // Fixed scales: the batch size does not matter.
            assert_eq!(evaluated, int8);
        } else {
            assert!((evaluated - int8).abs() <= 0.003, "{evaluated} vs {int8}");
        }
        assert_eq!(eval["inference"], report["inference"]);
    }
}

/// kiln's integer SimpleCNN with PyTorch's static int8 model's scales (weights per channel,
/// max|w| / 127; 7-bit activations min-max calibrated on the fixture input, by PyTorch:
/// tests/data/simple_cnn/quantized_static.py) gives PyTorch's quantized logits (FBGEMM, x86
/// engine) within one step of their quantization.
#[test]
fn int8_simple_cnn_gives_pytorch_static_int8_logits_with_the_same_scales() {
    use burn::tensor::Device;
    use kiln::models::quant::{Activations, Granularity, Int8SimpleCnn, QuantBits, QuantScheme};
    use kiln::models::{SimpleCnnConfig, load_weights};

    let text = std::fs::read_to_string(fixture("static_int8_scales.json")).unwrap();
    let scales: serde_json::Value = serde_json::from_str(&text).unwrap();
    let point = |name: &str| {
        let (s, z) = (&scales[name]["scale"], &scales[name]["zero_point"]);
        (s.as_f64().unwrap() as f32, z.as_i64().unwrap() as f32)
    };
    // PyTorch's (scale, zero point) as the range kiln's 7-bit map is made from.
    let ranges = ["image", "conv2_input", "fc1_input", "fc2_input"]
        .map(|name| {
            let (s, z) = point(name);
            [-z * s, (127.0 - z) * s]
        })
        .to_vec();
    let mut model = SimpleCnnConfig::new().init(&Device::flex(), 0);
    let _ = load_weights(&mut model, &fixture("simple_cnn.safetensors")).unwrap();
    let scheme = QuantScheme {
        bits: QuantBits::Int8,
        granularity: Granularity::Channel,
    };
    let activations = Activations::Static { ranges, batches: 0 };
    let int8 = Int8SimpleCnn::new(&model, scheme, activations).unwrap();
    let input = npy(&fixture("input.npy")).values;
    let ours = int8.forward(&input, input.len() / 784);
    let pytorch = npy(&fixture("logits_static_int8.npy")).values;
    let (step, _) = point("logits");
    let steps = max_abs_diff(&ours, &pytorch) / step;
    eprintln!("kiln int8 vs PyTorch static int8 logits: max |delta| = {steps} quantization steps");
    assert!(steps <= 1.0, "{steps} steps apart");
    // Not trivially close: the float model is farther away.
    let float = npy(&fixture("logits.npy")).values;
    assert!(
        max_abs_diff(&float, &pytorch) / step > steps,
        "float is as close as int8"
    );
}
