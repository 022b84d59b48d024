//! Experiments: configuration files (`--config`, `--print-config`, a run's `config.toml`),
//! TensorBoard event files, `kiln runs` and `kiln plot`, through the `kiln` binary.

use std::path::Path;

use crate::common::{assert_clean_failure, kiln, kiln_ok, last_json};

fn metrics_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What a run computed, without its timings.
fn results(run: &Path) -> Vec<(f64, f64, f64)> {
    metrics_lines(run)
        .iter()
        .map(|m| {
            let f = |k: &str| m[k].as_f64().unwrap();
            (f("train_loss"), f("test_loss"), f("test_accuracy"))
        })
        .collect()
}

/// A PNG file of `width` x `height` pixels (its IHDR chunk).
fn assert_png(path: &Path, (width, height): (u32, u32)) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (width, height), "{}", path.display());
}

#[test]
fn a_runs_config_toml_reproduces_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("experiment.toml");
    std::fs::write(
        &file,
        "# two ranks, a cosine schedule with warm-up\nlimit = 384\nepochs = 2\n\
         ranks = 2\nlr-schedule = \"cosine\"\nwarmup-steps = 3\nbatch-size = 32\n",
    )
    .unwrap();
    let first = dir.path().join("first");
    let (file_arg, first_arg) = (file.to_str().unwrap(), first.to_str().unwrap());
    // A flag beside the file overrides it.
    let args = ["train", "cnn-mnist", "--config", file_arg, "--lr", "0.03"];
    let out = kiln_ok(&[&args[..], &["--out", first_arg, "-q", "--json"]].concat());
    assert_eq!(last_json(&out)["epochs"], 2);
    let written = std::fs::read_to_string(first.join("config.toml")).unwrap();
    for line in [
        "lr = 0.03",
        "ranks = 2",
        "lr-schedule = \"cosine\"",
        "optimizer = \"sgd\"",
    ] {
        assert!(written.contains(line), "{line} missing in:\n{written}");
    }
    assert!(!written.contains("\nout ="), "{written}");
    let again = dir.path().join("again");
    let config = first.join("config.toml");
    kiln_ok(&[
        "train",
        "cnn-mnist",
        "--config",
        config.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(results(&again), results(&first), "bit for bit");
    // Every run draws its curves; `kiln plot` draws both runs on one chart.
    assert_png(&first.join("curves.png"), (1680, 420));
    let chart = dir.path().join("both.png");
    let plotted = kiln_ok(&[
        "plot",
        first_arg,
        again.to_str().unwrap(),
        "--metric",
        "loss/validation",
        "--metric",
        "optimizer/lr",
        "--out",
        chart.to_str().unwrap(),
        "--json",
    ]);
    let plotted = last_json(&plotted);
    assert_eq!(plotted["metrics"][1], "optimizer/lr");
    // 2 epochs of 12 steps (384 samples, batch 32): 2 validation points and 24 rates.
    assert_eq!(plotted["points"]["first"], 26);
    assert_png(&chart, (1120, 420));
    let output = kiln(&["plot", first_arg, "--metric", "loss/nope", "--out", "x.png"]);
    assert_clean_failure(
        &output,
        &["no run has the metric \"loss/nope\"", "loss/validation"],
    );
    let output = kiln(&["plot", "/nonexistent/run", "--out", "x.png"]);
    assert_clean_failure(&output, &["/nonexistent/run is not a run directory"]);
    // --print-config shows the same keys and trains nothing.
    let printed = kiln_ok(&[
        "train",
        "cnn-mnist",
        "--config",
        config.to_str().unwrap(),
        "--print-config",
    ]);
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert!(
        printed.contains("lr = 0.03") && printed.contains("epochs = 2"),
        "{printed}"
    );
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn bad_config_files_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let cases: [(&str, &[&str]); 6] = [
        (
            "epochs = 1\nbatch_size = 8\n",
            &["line 2", "unknown key `batch_size`", "batch-size"],
        ),
        (
            "\n\nepochs = \"five\"\n",
            &["line 3", "`epochs`", "invalid value 'five'"],
        ),
        ("nesterov = 1\n", &["line 1", "`nesterov` is a switch"]),
        ("lr = true\n", &["line 1", "`lr` takes a value"]),
        (
            "optimizer = \"lion\"\n",
            &["line 1", "possible values: sgd, adam, adamw"],
        ),
        ("epochs = [1\n", &["TOML parse error at line 1"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let output = kiln(&[
            "train",
            "cnn-mnist",
            "--config",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let name = file.to_str().unwrap();
        assert_clean_failure(&output, &[&[name][..], needles].concat());
    }
    let missing = dir.path().join("missing.toml");
    let output = kiln(&["finetune", "--config", missing.to_str().unwrap()]);
    assert_clean_failure(&output, &[missing.to_str().unwrap(), "cannot read it"]);
    assert!(!out.exists(), "nothing was written");
}

#[test]
fn kiln_runs_tells_finished_from_stopped_runs() {
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    kiln_ok(&[
        "train",
        "cnn-mnist",
        "--limit",
        "256",
        "--epochs",
        "1",
        "--ranks",
        "2",
        "--out",
        done.to_str().unwrap(),
        "-q",
    ]);
    // A run killed (SIGKILL) in its first epoch: it cannot say so itself.
    let killed = dir.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "cnn-mnist", "--epochs", "50", "-q", "--out"])
        .arg(&killed)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = killed.join("run.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !state.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = kiln_ok(&["runs", dir.path().to_str().unwrap(), "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let find = |name: &str| {
        rows.iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .unwrap()
            .clone()
    };
    let (done_row, killed_row) = (find("done"), find("killed"));
    assert_eq!(done_row["status"], "finished");
    assert_eq!(done_row["mode"], "data parallel x2");
    assert_eq!(done_row["epochs_done"], 1);
    assert_eq!(done_row["recipe"], "cnn-mnist");
    let accuracy = metrics_lines(&done)[0]["test_accuracy"].as_f64().unwrap();
    assert_eq!(done_row["best"]["value"].as_f64(), Some(accuracy));
    assert_eq!(killed_row["status"], "stopped");
    assert_eq!(killed_row["planned_epochs"], 50);
    let table = kiln_ok(&["runs", dir.path().to_str().unwrap()]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("run "), "{table}");
    assert!(
        table.contains("finished") && table.contains("stopped"),
        "{table}"
    );
    let missing = dir.path().join("nope");
    assert_clean_failure(&kiln(&["runs", missing.to_str().unwrap()]), &["nope"]);
}
