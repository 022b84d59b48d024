//! Pipeline training through the CLI: the same run as one device, for every schedule.

use crate::common::{assert_clean_failure, kiln, train_cnn_mnist};

fn train(out: &std::path::Path, epochs: &str, extra: &[&str]) -> serde_json::Value {
    train_cnn_mnist("512", out, epochs, extra)
}

#[test]
fn kiln_train_through_a_pipeline_matches_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let single = train(&dir.path().join("single"), "1", &[]);
    assert!(single.get("bubble_fraction").is_none());
    let cases: [&[&str]; 3] = [
        &["--pipeline-stages", "2", "--schedule", "naive"],
        &[
            "--pipeline-stages",
            "2",
            "--micro-batches",
            "4",
            "--schedule",
            "gpipe",
        ],
        &[
            "--pipeline-stages",
            "3",
            "--micro-batches",
            "8",
            "--schedule",
            "1f1b",
        ],
    ];
    for (k, flags) in cases.into_iter().enumerate() {
        let piped = train(&dir.path().join(format!("pipe{k}")), "1", flags);
        for key in ["test_loss", "train_loss", "test_accuracy"] {
            let (a, b) = (single[key].as_f64().unwrap(), piped[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "{flags:?}: {key} {a} vs {b}");
        }
        let bubble = piped["bubble_fraction"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{bubble}");
        assert_eq!(
            piped["pipeline"]["stages"],
            flags[1].parse::<u64>().unwrap()
        );
    }
}

#[test]
fn unsupported_pipeline_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let output = kiln(&["train", "cnn-mnist", "--pipeline-stages", "4", "--out", out]);
    assert_clean_failure(&output, &["--pipeline-stages", "2 stages", "not 4"]);
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--pipeline-stages",
        "2",
        "--ranks",
        "2",
        "--out",
        out,
    ]);
    assert_clean_failure(&output, &["--pipeline-stages", "--ranks"]);
    // --schedule without a pipeline is a usage error.
    let output = kiln(&["train", "cnn-mnist", "--schedule", "gpipe"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_pipeline_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--pipeline-stages", "2", "--micro-batches", "4"];
    let straight = train(&dir.path().join("straight"), "2", &flags);
    let split = dir.path().join("split");
    train(&split, "1", &flags);
    let resumed = train(&split, "2", &[&flags[..], &["--resume"]].concat());
    assert_eq!(resumed["resumed_from_epoch"], 1);
    for key in ["test_loss", "train_loss", "test_accuracy"] {
        assert_eq!(straight[key], resumed[key], "{key}");
    }
}
