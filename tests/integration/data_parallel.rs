//! Data-parallel training through the trainer and the CLI, checked against one device.

use std::time::Duration;

use burn::tensor::Device;
use kiln::models::{SimpleCnn, SimpleCnnConfig};
use kiln::multi::data_parallel::flatten_params;
use kiln::multi::{BucketConfig, CollectiveConfig};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::MnistSplit;
use kiln::trainer::report::Verbosity;
use kiln::trainer::{DataParallelConfig, Execution, RunLabels, TrainData, Trainer, TrainerConfig};

use crate::common::{assert_clean_failure, kiln, max_abs_diff, train_cnn_mnist};

fn fit(execution: &Execution, epochs: usize) -> (Vec<f32>, Vec<f64>) {
    let train = MnistSource::Embedded
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
    };
    let trainer = Trainer::new(config, run.path(), labels)
        .unwrap()
        .with_verbosity(Verbosity::Quiet);
    let device = Device::flex().autodiff();
    let model = SimpleCnnConfig::new().init(&device, 3);
    let data = TrainData {
        train: &train,
        test: &test,
    };
    let (model, report) = trainer
        .fit(model, SimpleCnn::forward, data, None, execution)
        .unwrap();
    let metrics = report.history.last().unwrap();
    assert_eq!(metrics.step, 10 * epochs as u64);
    let params = flatten_params(&model).unwrap();
    (
        params,
        vec![metrics.test_loss, metrics.test_accuracy, metrics.train_loss],
    )
}

#[test]
fn trainer_on_two_ranks_of_32_matches_one_device_with_64() {
    let device = Device::flex().autodiff();
    let (single, single_metrics) = fit(&Execution::Single(device.clone()), 2);
    let parallel = Execution::DataParallel(DataParallelConfig {
        devices: vec![device; 2],
        collective: CollectiveConfig {
            timeout: Duration::from_secs(60),
        },
        buckets: BucketConfig::default(),
    });
    let (ranks2, ranks2_metrics) = fit(&parallel, 2);
    // 20 SGD-momentum steps over the same samples: equal up to float summation order.
    let diff = max_abs_diff(&single, &ranks2);
    eprintln!("SimpleCNN 2 x 32 vs 1 x 64, 20 steps: max |delta param| = {diff:e}");
    assert!(diff < 1e-5, "parameters differ by {diff}");
    // Sharded evaluation and averaged training loss agree with one device's.
    for (a, b) in single_metrics.iter().zip(&ranks2_metrics) {
        assert!(
            (a - b).abs() < 1e-4,
            "{single_metrics:?} vs {ranks2_metrics:?}"
        );
    }
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
