//! `kiln finetune` on the shipped digits folder: a torchvision ResNet-18 from PyTorch weights
//! with a new head, frozen or not; the checkpoint evaluates and resumes; bad input fails
//! cleanly.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use kiln::models::{ResNet, ResNetDepth, load_weights};

use crate::common::{
    assert_clean_failure, eval_json, kiln, kiln_ok, last_json, quantize_json, repo,
    resnet18_weights,
};

fn finetune(out: &Path, extra: &[&str]) -> serde_json::Value {
    let base = [
        "finetune",
        "--image-size",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--json",
        "-q",
    ];
    last_json(&kiln_ok(&[&base[..], extra].concat()))
}

/// Collects the values of every float tensor a module visits.
struct Collect(Vec<f32>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.extend(param.val().into_data().iter::<f32>());
    }
}

/// Every backbone value (convolutions, BatchNorm affine parameters), plus bn1's running
/// statistics, which a frozen backbone must not update either.
fn backbone_values(model: &ResNet) -> Vec<f32> {
    let mut c = Collect(Vec::new());
    model.conv1.visit(&mut c);
    model.bn1.visit(&mut c);
    for block in model
        .layer1
        .iter()
        .chain(&model.layer2)
        .chain(&model.layer3)
        .chain(&model.layer4)
    {
        block.visit(&mut c);
    }
    c.0.extend(model.bn1.running_mean.value().into_data().iter::<f32>());
    c.0.extend(model.bn1.running_var.value().into_data().iter::<f32>());
    c.0
}

#[test]
fn frozen_backbone_trains_the_head_only_and_weights_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let weights = resnet18_weights(dir.path(), "pth");
    let run = dir.path().join("frozen");
    let report = finetune(
        &run,
        &[
            "--weights",
            weights.to_str().unwrap(),
            "--freeze-backbone",
            "--epochs",
            "1",
            "--num-classes",
            "10",
        ],
    );
    // fc: 512 x 10 + 10.
    assert_eq!(report["trainable_parameters"], 5130);
    assert_eq!(report["classes"].as_array().unwrap().len(), 10);
    assert!(report["initial_accuracy"].as_f64().is_some());
    // The written weights: backbone (convolutions and BatchNorm statistics) exactly PyTorch's,
    // head trained.
    let device = burn::tensor::Device::flex();
    let mut original = ResNet::new(ResNetDepth::R18, 1000, &device);
    let _ = load_weights(&mut original, &weights).unwrap();
    let mut tuned = ResNet::new(ResNetDepth::R18, 10, &device);
    let _ = load_weights(&mut tuned, &run.join("model.safetensors")).unwrap();
    assert_eq!(backbone_values(&original), backbone_values(&tuned));
    let head: Vec<f32> = tuned.fc.weight.val().into_data().iter::<f32>().collect();
    assert!(head.iter().any(|v| *v != 0.0));
    // The checkpoint evaluates to the accuracy training reported.
    let eval = eval_json(&run);
    assert_eq!(eval["test_accuracy"], report["test_accuracy"]);
    assert_eq!(eval["model"], "resnet18");
    // int8 quantization of the fine-tuned ResNet, evaluated on its validation folder; the file
    // evaluates back to the accuracy the report measured.
    let quantized = quantize_json(&run, "1", &[]);
    assert_eq!(quantized["model"], "resnet18");
    assert!(
        quantized["size_ratio"].as_f64().unwrap() < 0.26,
        "{quantized}"
    );
    assert_eq!(quantized["fp32_accuracy"], report["test_accuracy"]);
    // It runs on the integer path (BatchNorms folded, static activations). This one-epoch head
    // is at chance with nearly equal logits, so its argmax agreement says little; the integer
    // ResNet's closeness to float is `resnet::resnet18_runs_on_the_integer_path_close_to_float`.
    let inference = quantized["inference"].as_str().unwrap();
    assert!(
        inference.starts_with("int8") && inference.contains("static"),
        "{quantized}"
    );
    let file = run.join("resnet18-int8-tensor.safetensors");
    let eval = eval_json(&file);
    assert_eq!(eval["test_accuracy"], quantized["quantized_accuracy"]);
    assert_eq!(eval["inference"], quantized["inference"]);
    // Top-5 classes of every image of a directory, named after the folder's classes.
    let images = repo("data/digits/val/3");
    let predicted = last_json(&kiln_ok(&[
        "predict",
        "--checkpoint",
        run.to_str().unwrap(),
        "--image",
        images.to_str().unwrap(),
        "--json",
    ]));
    let predicted = predicted["images"].as_array().unwrap();
    assert_eq!(predicted.len(), 20);
    for image in predicted {
        let top = image["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let p: Vec<f64> = top
            .iter()
            .map(|c| c["probability"].as_f64().unwrap())
            .collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-6);
        let class = top[0]["class"].as_str().unwrap();
        assert_eq!(class, top[0]["index"].as_u64().unwrap().to_string());
    }
}

/// CIFAR-10's binary layout (synthetic records here: the real set cannot be downloaded in CI)
/// trains on 2 data-parallel ranks and reports CIFAR's class names.
#[test]
fn cifar10_binary_batches_fine_tune_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let record = |i: usize| -> Vec<u8> {
        let mut r = vec![(i % 10) as u8];
        r.extend((0..3072).map(|j| ((i * 31 + j * 7) % 256) as u8));
        r
    };
    let train: Vec<u8> = (0..32).flat_map(record).collect();
    let test: Vec<u8> = (0..10).flat_map(record).collect();
    std::fs::write(dir.path().join("data_batch_1.bin"), train).unwrap();
    std::fs::write(dir.path().join("test_batch.bin"), test).unwrap();
    let out = dir.path().join("run");
    let report = finetune(
        &out,
        &[
            "--data",
            dir.path().to_str().unwrap(),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--ranks",
            "2",
        ],
    );
    assert_eq!(report["ranks"], 2);
    assert_eq!(report["image_size"], 32);
    assert_eq!(report["classes"][0], "airplane");
    assert_eq!(report["history"][0]["step"], 2);
}

#[test]
fn resumed_finetuning_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let whole = finetune(&dir.path().join("whole"), &["--epochs", "2"]);
    let part = dir.path().join("part");
    finetune(&part, &["--epochs", "1"]);
    let resumed = last_json(&kiln_ok(&[
        "finetune",
        "--resume",
        part.to_str().unwrap(),
        "--epochs",
        "2",
        "--json",
        "-q",
    ]));
    assert_eq!(resumed["resumed_from_epoch"], 1);
    // Augmentation is drawn from (seed, epoch, index): epoch 2 sees the same crops.
    assert_eq!(
        resumed["history"][1]["train_loss"],
        whole["history"][1]["train_loss"]
    );
    assert_eq!(
        resumed["history"][1]["test_accuracy"],
        whole["history"][1]["test_accuracy"]
    );
}

#[test]
fn bad_finetuning_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let weights = resnet18_weights(dir.path(), "pth");
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    // The wrong class count.
    let output = kiln(&["finetune", "--num-classes", "5", "--out", out, "-q"]);
    assert_clean_failure(&output, &["--num-classes", "10 classes", "not 5"]);
    // The wrong model: ResNet-18 weights for a ResNet-50.
    let output = kiln(&[
        "finetune",
        "--model",
        "resnet50",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out,
        "-q",
    ]);
    assert_clean_failure(
        &output,
        &["do not match the model", "layer1.0.conv3.weight"],
    );
    // A truncated weight file.
    let bytes = std::fs::read(&weights).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let output = kiln(&[
        "finetune",
        "--weights",
        truncated.to_str().unwrap(),
        "--out",
        out,
        "-q",
    ]);
    assert_clean_failure(&output, &["truncated.pth"]);
    // A folder without train/ and val/.
    let output = kiln(&[
        "finetune",
        "--data",
        dir.path().to_str().unwrap(),
        "--out",
        out,
        "-q",
    ]);
    assert_clean_failure(&output, &["no train/ directory"]);
    let output = kiln(&["finetune", "--image-size", "16", "--out", out, "-q"]);
    assert_clean_failure(&output, &["--image-size", "at least 32x32"]);
    assert!(
        !Path::new(out).join("checkpoints").exists(),
        "nothing was trained"
    );
}
