//! Bad input through the `kiln` binary: a clear message naming the problem, exit code 1,
//! never a panic, and nothing already written is lost.

use std::path::Path;

use crate::common::{assert_clean_failure, gunzip, gzip, kiln, repo};

/// Copies the embedded MNIST subset into `dir`, then lets `corrupt` damage one file.
fn mnist_dir_with(dir: &Path, name: &str, corrupt: fn(Vec<u8>) -> Vec<u8>) {
    for file in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        let bytes = std::fs::read(repo("data/mnist").join(file)).unwrap();
        let bytes = if file == name { corrupt(bytes) } else { bytes };
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

#[test]
fn corrupt_truncated_and_wrong_magic_idx_files_fail_cleanly() {
    type Corruption = fn(Vec<u8>) -> Vec<u8>;
    let cases: [(&str, Corruption, &[&str]); 4] = [
        // The gzip stream cut in half.
        (
            "t10k-images-idx3-ubyte.gz",
            |b| b[..b.len() / 2].to_vec(),
            &[
                "t10k-images-idx3-ubyte.gz",
                "gzip stream is corrupt or truncated",
            ],
        ),
        // A valid gzip of a payload one image short.
        (
            "train-images-idx3-ubyte.gz",
            |b| {
                let raw = gunzip(&b);
                gzip(&raw[..raw.len() - 784])
            },
            &["train-images-idx3-ubyte.gz", "(truncated)"],
        ),
        // Labels where images are expected.
        (
            "t10k-labels-idx1-ubyte.gz",
            |b| {
                let mut raw = gunzip(&b);
                raw[3] = 3;
                gzip(&raw)
            },
            &["t10k-labels-idx1-ubyte.gz", "wrong magic number 0x00000803"],
        ),
        // Bytes that are not gzip at all and not IDX either.
        (
            "train-labels-idx1-ubyte.gz",
            |_| b"hello".to_vec(),
            &[
                "train-labels-idx1-ubyte.gz",
                "wrong magic number 0x68656c6c",
            ],
        ),
    ];
    for (name, corrupt, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("mnist");
        std::fs::create_dir(&data).unwrap();
        mnist_dir_with(&data, name, corrupt);
        let out = dir.path().join("run");
        let output = kiln(&[
            "train",
            "cnn-mnist",
            "--epochs",
            "1",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&output, needles);
        let output = kiln(&[
            "eval",
            "--checkpoint",
            "/nonexistent",
            "--data",
            data.to_str().unwrap(),
        ]);
        assert_clean_failure(&output, &["/nonexistent", "no such file or directory"]);
    }
}

#[test]
fn missing_data_directory_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--data",
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["train-images-idx3-ubyte.gz"]);
}

#[test]
fn bad_checkpoints_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.ckpt");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    assert_clean_failure(
        &kiln(&["eval", "--checkpoint", junk.to_str().unwrap()]),
        &["junk.ckpt", "not a kiln checkpoint"],
    );
    let empty_run = dir.path().join("empty-run");
    std::fs::create_dir(&empty_run).unwrap();
    assert_clean_failure(
        &kiln(&["eval", "--checkpoint", empty_run.to_str().unwrap()]),
        &["holds no checkpoints/epoch-*.ckpt"],
    );
    assert_clean_failure(
        &kiln(&["train", "cnn-mnist", "--resume", junk.to_str().unwrap()]),
        &["not a kiln checkpoint"],
    );
}

#[test]
fn bad_flags_are_rejected_with_usage() {
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--batch-size",
        "0",
        "--out",
        "/tmp/kiln-never-created",
    ]);
    assert_clean_failure(&output, &["--batch-size must be at least 1"]);
    assert!(!Path::new("/tmp/kiln-never-created").exists());
    let output = kiln(&["train", "cnn-mnist", "--lr", "fast"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid value 'fast'"));
    let output = kiln(&["eval"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--checkpoint"));
}

/// Asking for a GPU that is not there (a build without `cuda`, or no NVIDIA driver, or an index
/// past the last GPU) fails before training starts, with what to do, and writes nothing.
#[test]
fn missing_cuda_device_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // No machine has 1000 GPUs: an error in every build, with or without a GPU.
    let output = kiln(&[
        "train",
        "cnn-mnist",
        "--device",
        "cuda:1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["device cuda:1000: "]);
    assert!(!out.join("checkpoints").exists());
    let output = kiln(&[
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--device",
        "cuda:1000",
    ]);
    assert_clean_failure(&output, &["device cuda:1000: "]);
    for args in [
        &["check-device", "--device", "cuda:1000"][..],
        &["bench", "resnet18", "--device", "cuda:1000"],
    ] {
        assert_clean_failure(&kiln(args), &["device cuda:1000: "]);
    }
    if !cfg!(feature = "cuda") {
        let output = kiln(&[
            "train",
            "cnn-mnist",
            "--device",
            "cuda:0",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&output, &["device cuda:0: ", "--features cuda"]);
        let output = kiln(&[
            "finetune",
            "--device",
            "cuda",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&output, &["device cuda:0: "]);
        let output = kiln(&["collectives", "--device", "cuda:0"]);
        assert_clean_failure(&output, &["device cuda:0: "]);
    }
    if !cfg!(feature = "wgpu") {
        for args in [
            &["train", "cnn-mnist", "--device", "wgpu"][..],
            &["check-device", "--device", "wgpu:0"],
            &[
                "train",
                "cnn-mnist",
                "--device",
                "wgpu:0:shared",
                "--ranks",
                "2",
            ],
        ] {
            let device = if args.contains(&"wgpu:0:shared") {
                "device wgpu:0:shared: "
            } else {
                "device wgpu:0: "
            };
            assert_clean_failure(&kiln(args), &[device, "--features wgpu"]);
        }
    }
    // An adapter index past the last names the adapters there are (or the missing feature).
    let output = kiln(&["check-device", "--device", "wgpu:1000"]);
    assert_clean_failure(&output, &["device wgpu:1000: "]);
    let output = kiln(&["train", "cnn-mnist", "--device", "tpu"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected cpu, cuda, cuda:N, wgpu, wgpu:N or wgpu:N:shared"),
        "{stderr}"
    );
}

/// `KILN_ISA` caps kiln's kernels; a value it does not know stops the command before it runs
/// (naming the accepted ones) instead of silently measuring another path, and a known one is
/// taken.
#[test]
fn an_unknown_instruction_set_cap_is_refused() {
    let run = |value: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["runs", "/nonexistent-kiln-runs-dir"])
            .env("KILN_ISA", value)
            .output()
            .expect("the kiln binary runs")
    };
    assert_clean_failure(
        &run("avx-512"),
        &["KILN_ISA=\"avx-512\"", "avx512, avx2 or scalar"],
    );
    let known = String::from_utf8_lossy(&run("scalar").stderr).into_owned();
    assert!(!known.contains("KILN_ISA"), "{known}");
}
