//! Data-parallel training through the trainer and the CLI, checked against one device.

use std::time::Duration;

use burn::tensor::Device;
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::multi::data_parallel::flatten_params;
use kiln::multi::{BucketConfig, CollectiveConfig, Transport, ZeroStage};
use kiln::recipes::cnn_mnist::TensorParallelCnn;
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::MnistSplit;
use kiln::trainer::report::Verbosity;
use kiln::trainer::{
    DataParallelConfig, Execution, FitReport, RunLabels, TensorParallelSplit, TrainData, Trainer,
    TrainerConfig,
};

use crate::common::{
    assert_clean_failure, eval_json, kiln, kiln_ok, last_json, max_abs_diff, train_cnn_mnist,
};

fn fit(execution: &Execution, epochs: usize) -> (Vec<f32>, Vec<f64>) {
    fit_with(epochs, |trainer, model, data| {
        trainer.fit(model, SimpleCnn::forward, data, None, execution)
    })
}

/// SimpleCNN (seed 3) trained for `epochs` of 10 steps (640 samples, batch 64) by `train`:
/// its parameters, and the last epoch's test loss, test accuracy and train loss.
fn fit_with(
    epochs: usize,
    train: impl FnOnce(
        &Trainer,
        SimpleCnn,
        TrainData<'_>,
    ) -> kiln::trainer::Result<(SimpleCnn, FitReport)>,
) -> (Vec<f32>, Vec<f64>) {
    let train_set = MnistSource::Embedded
        .load(MnistSplit::Train)
        .unwrap()
        .take(640);
    let test = MnistSource::Embedded
        .load(MnistSplit::Test)
        .unwrap()
        .take(300);
    let config = TrainerConfig {
        epochs,
        batch_size: 64,
        ..TrainerConfig::default()
    };
    let run = tempfile::tempdir().unwrap();
    let labels = RunLabels {
        recipe: "dp-test".into(),
        model: "simple-cnn".into(),
        quantization: None,
        options: Default::default(),
    };
    let trainer = Trainer::new(config, run.path(), labels)
        .unwrap()
        .with_verbosity(Verbosity::Quiet);
    let device = Device::flex().autodiff();
    let model = SimpleCnnConfig::new().init(&device, 3);
    let data = TrainData {
        train: &train_set,
        test: &test,
    };
    let (model, report) = train(&trainer, model, data).unwrap();
    let metrics = report.history.last().unwrap();
    assert_eq!(metrics.step, 10 * epochs as u64);
    let params = flatten_params(&model).unwrap();
    (
        params,
        vec![
            metrics.test_loss,
            metrics.test_accuracy.unwrap_or(f64::NAN),
            metrics.train_loss,
        ],
    )
}

/// SimpleCNN's classifier split over 2 ranks (Megatron column/row split) through the
/// trainer: 20 SGD-momentum steps give the parameters and metrics of one device; over 4
/// ranks, 10 steps. (Over 4 ranks the 20-step difference is 1.0e-5, in one conv2 weight:
/// the conv gradients, summed from 4 partial products, differ from one device's in the last
/// bits, which by step 20 flips a near-tie of a max-pool; data parallelism on 4 ranks stays at
/// 3e-8 there. It is the same computation in another summation order.)
#[test]
fn tensor_parallel_training_matches_one_device() {
    let device = Device::flex().autodiff();
    for (ranks, epochs) in [(2, 2), (4, 1)] {
        let (single, single_metrics) = fit(&Execution::Single(device.clone()), epochs);
        let (parallel, metrics) = fit_with(epochs, |trainer, model, data| {
            let split = TensorParallelSplit {
                devices: vec![device.clone(); ranks],
                collective: CollectiveConfig {
                    timeout: Duration::from_secs(60),
                },
                transport: Transport::SharedMemory,
                split: &TensorParallelCnn::split,
                gather: &TensorParallelCnn::gather,
                sync_gradients: &TensorParallelCnn::sync_gradients,
                split_params: &TensorParallelCnn::split_params,
                data_parallel: None,
                process_group: None,
                pipeline_stages: None,
                zero: None,
            };
            trainer.fit_tensor_parallel(model, TensorParallelCnn::forward, data, None, split)
        });
        let diff = max_abs_diff(&single, &parallel);
        eprintln!(
            "SimpleCNN classifier over {ranks} ranks vs one device, {} steps: max |delta param| = {diff:e}",
            10 * epochs
        );
        assert!(diff < 1e-5, "parameters differ by {diff}");
        for (a, b) in metrics.iter().zip(&single_metrics) {
            assert!(
                (a - b).abs() < 1e-4,
                "metrics {metrics:?} vs {single_metrics:?}"
            );
        }
    }
}

#[test]
fn trainer_on_two_ranks_of_32_matches_one_device_with_64() {
    let device = Device::flex().autodiff();
    let (single, single_metrics) = fit(&Execution::Single(device.clone()), 2);
    // Plain data parallelism, then the optimizer state (and gradients) sharded.
    for zero in [None, Some(ZeroStage::One), Some(ZeroStage::Two)] {
        let parallel = Execution::DataParallel(DataParallelConfig {
            devices: vec![device.clone(); 2],
            collective: CollectiveConfig {
                timeout: Duration::from_secs(60),
            },
            transport: Transport::SharedMemory,
            buckets: BucketConfig::default(),
            zero,
        });
        let (ranks2, ranks2_metrics) = fit(&parallel, 2);
        // 20 SGD-momentum steps over the same samples: equal up to float summation order.
        let diff = max_abs_diff(&single, &ranks2);
        eprintln!(
            "SimpleCNN 2 x 32 (ZeRO {:?}) vs 1 x 64, 20 steps: max |delta param| = {diff:e}",
            zero.map(ZeroStage::number)
        );
        assert!(diff < 1e-5, "parameters differ by {diff}");
        // Sharded evaluation and averaged training loss agree with one device's.
        for (a, b) in single_metrics.iter().zip(&ranks2_metrics) {
            assert!(
                (a - b).abs() < 1e-4,
                "{single_metrics:?} vs {ranks2_metrics:?}"
            );
        }
    }
}

#[test]
fn kiln_train_with_zero_reports_bytes_per_rank_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let zero2 = ["--ranks", "2", "--zero", "2"];
    let uninterrupted = train_cnn_mnist("1024", &whole, "2", &zero2);
    let sharding = &uninterrupted["sharding"];
    assert_eq!(sharding["zero_stage"], 2, "{uninterrupted}");
    let elements = sharding["parameter_elements"].as_u64().unwrap();
    // SGD momentum: one f32 per element, half of them per rank (the split is exact to 1).
    let per_rank = sharding["optimizer_state_bytes_per_rank"].as_u64().unwrap();
    assert_eq!(sharding["unsharded_optimizer_state_bytes"], 4 * elements);
    assert!(
        (per_rank as i64 - (2 * elements) as i64).abs() <= 4,
        "{sharding}"
    );
    assert_eq!(sharding["gradient_bytes_per_rank"], per_rank);

    // Stopped after epoch 1 and resumed: the same second epoch, bit for bit.
    train_cnn_mnist("1024", &split, "1", &zero2);
    let resumed = train_cnn_mnist("1024", &split, "2", &[&zero2[..], &["--resume"]].concat());
    assert_eq!(resumed["resumed_from_epoch"], 1);
    for key in ["step", "train_loss", "test_loss", "test_accuracy"] {
        assert_eq!(
            resumed["history"][1][key], uninterrupted["history"][1][key],
            "{key}"
        );
    }

    // On 4 ranks, with stage 1: the state re-shards; same run up to summation order.
    let other = train_cnn_mnist(
        "1024",
        &split,
        "3",
        &["--ranks", "4", "--zero", "1", "--resume"],
    );
    assert_eq!(other["sharding"]["zero_stage"], 1);
    assert_eq!(other["ranks"], 4);

    // The checkpoint holds Burn's optimizer record gathered from the shards: it resumes
    // without ZeRO too, and continues as the sharded run did (up to summation order).
    let plain = dir.path().join("plain");
    train_cnn_mnist("1024", &plain, "1", &zero2);
    let resumed = train_cnn_mnist("1024", &plain, "2", &["--ranks", "2", "--resume"]);
    assert!(resumed["sharding"].is_null(), "{resumed}");
    for key in ["train_loss", "test_loss"] {
        let (a, b) = (
            &resumed["history"][1][key],
            &uninterrupted["history"][1][key],
        );
        let diff = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
        assert!(diff < 1e-5, "{key}: {a} vs {b}");
    }
    let fresh = dir.path().join("fresh");
    let out = kiln(&[
        "train",
        "cnn-mnist",
        "--limit",
        "64",
        "--zero",
        "1",
        "--out",
        fresh.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, &["--zero", "--ranks"]);
}

#[test]
fn kiln_train_with_ranks_reports_them_and_resumes_on_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let first = train_cnn_mnist("1024", &out, "1", &["--ranks", "2"]);
    assert_eq!(first["ranks"], 2);
    assert_eq!(first["global_batch_size"], 64);
    assert!(first["samples_per_sec"].as_f64().unwrap() > 0.0);
    assert!(first["test_accuracy"].as_f64().unwrap() > 0.5, "{first}");

    // The checkpoint of a 2-rank run continues on one rank.
    let resumed = train_cnn_mnist("1024", &out, "2", &["--resume"]);
    assert_eq!(resumed["resumed_from_epoch"], 1);
    assert_eq!(resumed["ranks"], 1);
}

#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--limit",
        "256",
        "--epochs",
        "1",
        "--ranks",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["--batch-size", "64", "3 ranks"]);
    // A usage error: clap's exit status 2, naming the flag.
    let output = kiln(&["train", "cnn-mnist", "--ranks", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--ranks"));
}

/// `kiln train --tensor-parallel 2`: the report says so, the checkpoint holds the whole
/// SimpleCNN (eval reads it and finds the run's accuracy), and what cannot work is refused.
#[test]
fn kiln_train_tensor_parallel_writes_a_whole_model_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let report = train_cnn_mnist("256", &out, "1", &["--tensor-parallel", "2"]);
    // Each rank keeps the conv blocks (18,816 parameters), half of fc1 (3136 x 64 + 64) and
    // half of fc2's weight (64 x 10) with its whole bias (10): 220,234 of 421,642.
    let parts = &report["tensor_parallel"];
    assert_eq!(parts["ranks"], 2);
    assert_eq!(parts["parameter_elements_per_rank"], 220_234);
    assert_eq!(parts["optimizer_state_bytes_per_rank"], 4 * 220_234);
    assert_eq!(parts["gradient_bytes_per_rank"], 4 * 220_234);
    assert_eq!(parts["unsharded_parameter_elements"], 421_642);
    assert_eq!(report["ranks"], 1);
    let eval = eval_json(&out);
    assert_eq!(eval["test_accuracy"], report["test_accuracy"]);
    // The checkpoint holds the whole optimizer state too: one device continues the run as
    // the tensor-parallel ranks would have.
    let resumed = last_json(&kiln_ok(&[
        "train",
        "cnn-mnist",
        "--limit",
        "256",
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--json",
        "-q",
    ]));
    let straight = train_cnn_mnist(
        "256",
        &dir.path().join("straight"),
        "2",
        &["--tensor-parallel", "2"],
    );
    assert_eq!(resumed["resumed_from_epoch"], 1);
    let diff =
        (resumed["test_loss"].as_f64().unwrap() - straight["test_loss"].as_f64().unwrap()).abs();
    eprintln!("tensor parallel 2 then one device vs tensor parallel 2 throughout: {diff:e}");
    assert!(diff < 1e-5, "the resumed run differs by {diff}");
    let with_ranks = kiln(&[
        "train",
        "cnn-mnist",
        "--tensor-parallel",
        "2",
        "--ranks",
        "2",
        "--out",
        dir.path().join("other").to_str().unwrap(),
    ]);
    assert_clean_failure(&with_ranks, &["--tensor-parallel", "--ranks"]);
    // 128 hidden features do not split over 3 ranks.
    let uneven = kiln(&[
        "train",
        "cnn-mnist",
        "--tensor-parallel",
        "3",
        "--out",
        dir.path().join("uneven").to_str().unwrap(),
    ]);
    assert_clean_failure(&uneven, &["128", "3 ranks"]);
}

/// `KILN_DDP_OVERLAP=1`: the trainer hooks its data-parallel steps (the all-reduce overlapped
/// with backward), says so in run.json, and trains the same bits as the default sync after
/// backward, over two epochs of 2 ranks.
#[test]
fn kiln_train_with_overlapped_all_reduce_trains_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let train = |name: &str, overlap: &str| {
        let out = dir.path().join(name);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "cnn-mnist", "--limit", "1024", "--epochs", "2"])
            .args(["--ranks", "2", "--json", "-q", "--out"])
            .arg(&out)
            .env("KILN_DDP_OVERLAP", overlap)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        (
            last_json(&output),
            run["mode"].as_str().unwrap().to_string(),
        )
    };
    let (overlapped, mode) = train("overlapped", "1");
    assert_eq!(
        mode,
        "data parallel x2, all-reduce overlapped with backward"
    );
    let (after, mode) = train("after", "0");
    assert_eq!(mode, "data parallel x2");
    for key in ["train_loss", "test_loss", "test_accuracy"] {
        for epoch in 0..2 {
            assert_eq!(
                overlapped["history"][epoch][key],
                after["history"][epoch][key],
                "{key}, epoch {}",
                epoch + 1
            );
        }
    }
}
