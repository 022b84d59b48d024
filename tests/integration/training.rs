//! The cnn-mnist recipe end to end through the `kiln` binary: it learns, its checkpoints
//! evaluate to what training reported, and an interrupted run resumed with `--resume` ends
//! exactly where an uninterrupted run ends.

use crate::common::{assert_clean_failure, eval_json, kiln, train_cnn_mnist};

/// Training samples used by these tests, to keep them to seconds.
const LIMIT: &str = "1024";

fn train(out: &str, epochs: &str, resume: bool) -> serde_json::Value {
    let extra: &[&str] = if resume { &["--resume"] } else { &[] };
    train_cnn_mnist(LIMIT, std::path::Path::new(out), epochs, extra)
}

#[test]
fn resumed_run_equals_uninterrupted_run_and_checkpoints_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    let full = train(straight.to_str().unwrap(), "2", false);
    let first = train(split.to_str().unwrap(), "1", false);
    assert_eq!(first["epochs"], 1);
    let resumed = train(split.to_str().unwrap(), "2", true);
    assert_eq!(resumed["resumed_from_epoch"], 1);
    assert_eq!(resumed["epochs"], 2);
    // Exact equality: same shuffles, same restored momentum, same arithmetic.
    assert_eq!(full["test_loss"], resumed["test_loss"]);
    assert_eq!(full["test_accuracy"], resumed["test_accuracy"]);
    assert_eq!(full["train_loss"], resumed["train_loss"]);
    // 1,024 samples for 2 epochs reach about 0.77 test accuracy (chance is 0.10).
    let accuracy = full["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.70, "accuracy {accuracy}");

    // metrics.jsonl holds each epoch once, resumed or not.
    let lines = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);

    // eval of the run directory reproduces the reported test metrics.
    let eval = eval_json(&split);
    assert_eq!(eval["test_accuracy"], resumed["test_accuracy"]);
    let loss_gap =
        (eval["test_loss"].as_f64().unwrap() - resumed["test_loss"].as_f64().unwrap()).abs();
    assert!(loss_gap < 1e-9, "eval loss differs by {loss_gap}");
    assert_eq!(eval["epochs"], 2);

    // A fresh run into a used directory is refused, and the run is untouched.
    let before = std::fs::read(split.join("checkpoints/epoch-0002.ckpt")).unwrap();
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--limit",
        LIMIT,
        "--epochs",
        "1",
        "--out",
        split.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["already holds checkpoints", "--resume"]);
    assert_eq!(
        std::fs::read(split.join("checkpoints/epoch-0002.ckpt")).unwrap(),
        before
    );

    // Resuming with a different learning rate is refused: it would not be the same run.
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--limit",
        LIMIT,
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--out",
        split.to_str().unwrap(),
        "--resume",
    ]);
    assert_clean_failure(
        &output,
        &["--lr 0.01 (now 0.05)", "only --epochs may change"],
    );
}
