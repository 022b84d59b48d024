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

/// The optimizer flags reach the trainer: AdamW with a cosine schedule, clipping and
/// accumulation over 2 batches trains (4 optimizer steps for 512 samples in batches of 64),
/// the checkpoint records them, 2 ranks take the same steps, and a flag that does not fit
/// the optimizer is refused by name.
#[test]
fn optimizer_schedule_clipping_and_accumulation_flags() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--optimizer",
        "adamw",
        "--lr",
        "0.002",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "2",
        "--min-lr",
        "0.0002",
        "--clip-grad-norm",
        "1.0",
        "--accumulation-steps",
        "2",
    ];
    let one = train_cnn_mnist("512", &dir.path().join("one"), "2", &flags);
    let history = one["history"].as_array().unwrap();
    assert_eq!(history[0]["step"], 4, "{one}");
    assert_eq!(history[1]["step"], 8, "{one}");
    let accuracy = one["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "AdamW learned only {accuracy}");
    let two = train_cnn_mnist(
        "512",
        &dir.path().join("two"),
        "2",
        &[&flags[..], &["--ranks", "2"]].concat(),
    );
    let (a, b) = (
        one["test_loss"].as_f64().unwrap(),
        two["test_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5, "one device {a}, 2 ranks {b}");
    let checkpoint = kiln::trainer::checkpoint::read_checkpoint(
        &dir.path().join("one/checkpoints/epoch-0002.ckpt"),
    )
    .unwrap();
    let config = checkpoint.state.config;
    assert_eq!(config.optimizer.name(), "adamw");
    assert_eq!(config.clip_grad_norm, Some(1.0));
    assert_eq!(config.accumulation_steps.get(), 2);
    assert_eq!(
        config.schedule,
        kiln::trainer::LrSchedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 8,
            min_lr: 0.0002
        }
    );
    let out = dir.path().join("bad");
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--optimizer",
        "adam",
        "--nesterov",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(
        &output,
        &["--nesterov: applies to --optimizer sgd, not adam"],
    );
    assert!(!out.join("checkpoints").exists(), "nothing was written");
}
