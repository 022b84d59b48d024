//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::trainer::data::{ImageDataset, NpyArray, read_npy_f32};

/// Path of a file in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A SimpleCNN parity fixture (see tests/data/simple_cnn/generate.py).
pub fn fixture(name: &str) -> PathBuf {
    repo("tests/data/simple_cnn").join(name)
}

/// Unpacks the PyTorch-exported ResNet-18 fixture `tests/data/resnet18/resnet18.<ext>.gz`
/// (`ext` is `pth` or `safetensors`) into `dir` and returns its path.
pub fn resnet18_weights(dir: &Path, ext: &str) -> PathBuf {
    let packed = std::fs::read(repo(&format!("tests/data/resnet18/resnet18.{ext}.gz"))).unwrap();
    let path = dir.join(format!("resnet18.{ext}"));
    std::fs::write(&path, gunzip(&packed)).unwrap();
    path
}

/// Reads a float32 `.npy` fixture.
pub fn npy(path: &Path) -> NpyArray {
    read_npy_f32(path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// Largest absolute difference between two equally long slices. NaN when either holds a NaN at
/// the same place or the difference is one (`f32::max` would drop it), so a `< tolerance`
/// check fails on NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    kiln::multi::data_parallel::max_abs_diff(a, b)
}

/// Decompresses a gzip stream.
pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).unwrap();
    out
}

/// Compresses bytes with gzip.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, bytes).unwrap();
    encoder.finish().unwrap()
}

/// Runs the `kiln` binary with `args`.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

/// Asserts that `output` is a clean failure: non-zero exit, no panic, and a stderr that
/// contains every one of `needles`.
pub fn assert_clean_failure(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, stderr: {stderr}"
    );
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
}

/// Runs the `kiln` binary and fails the test, showing its stderr, unless it succeeds.
pub fn kiln_ok(args: &[&str]) -> Output {
    let output = kiln(args);
    assert!(
        output.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `kiln train cnn-mnist` on the first `limit` training samples for `epochs`, into `out`,
/// with `extra` flags; returns its `--json` report (the run must succeed).
pub fn train_cnn_mnist(limit: &str, out: &Path, epochs: &str, extra: &[&str]) -> serde_json::Value {
    let out = out.to_str().expect("temporary paths are UTF-8");
    let base = [
        "train",
        "cnn-mnist",
        "--limit",
        limit,
        "--epochs",
        epochs,
        "--out",
        out,
        "--json",
        "-q",
    ];
    last_json(&kiln_ok(&[&base[..], extra].concat()))
}

/// `kiln eval --checkpoint PATH --json`'s report (the run must succeed).
pub fn eval_json(checkpoint: &Path) -> serde_json::Value {
    last_json(&kiln_ok(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().expect("temporary paths are UTF-8"),
        "--json",
    ]))
}

/// `kiln quantize --checkpoint PATH --timing-batches N --json`'s report, with `extra` flags
/// (the run must succeed).
pub fn quantize_json(checkpoint: &Path, timing_batches: &str, extra: &[&str]) -> serde_json::Value {
    let base = [
        "quantize",
        "--checkpoint",
        checkpoint.to_str().expect("temporary paths are UTF-8"),
        "--timing-batches",
        timing_batches,
        "--json",
    ];
    last_json(&kiln_ok(&[&base[..], extra].concat()))
}

/// Last line of stdout, parsed as JSON.
pub fn last_json(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line {line:?} is not JSON: {e}"))
}

/// Preprocessed images held in memory with their labels, for feeding exact batches.
pub struct ArrayDataset {
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    pub shape: [usize; 3],
}

impl ImageDataset for ArrayDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn sample(&self, index: usize, pixels: &mut [f32]) -> usize {
        let size: usize = self.shape.iter().product();
        pixels.copy_from_slice(&self.pixels[index * size..(index + 1) * size]);
        self.labels[index]
    }
}

#[test]
fn max_abs_diff_reports_nan_so_tolerance_checks_fail() {
    let diff = max_abs_diff(&[1.0, f32::NAN, 2.0], &[1.0, 0.0, 2.0]);
    assert!(diff.is_nan(), "{diff}");
    let all_nan = max_abs_diff(&[f32::NAN; 3], &[f32::NAN; 3]);
    assert!(all_nan.is_nan() && all_nan.partial_cmp(&1e-5).is_none());
    assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, -2.0]), 0.5);
}

/// The shipped Tiny Shakespeare's first 20 kB as `dir/small.txt` (written once).
pub fn small_text(dir: &Path) -> PathBuf {
    let path = dir.join("small.txt");
    if !path.exists() {
        let text = std::fs::read(repo("data/shakespeare/input.txt")).unwrap();
        std::fs::write(&path, &text[..20_000]).unwrap();
    }
    path
}

/// `kiln train gpt`'s flags for a tiny model (`layers` blocks of 2 heads, 16 wide, windows of
/// 16 bytes, batches of 16, lr 1e-2) on `data` into `out` for `epochs`, quiet, with `--json`,
/// then `extra`.
pub fn tiny_gpt_args(
    data: &Path,
    out: &Path,
    layers: &str,
    epochs: &str,
    extra: &[&str],
) -> Vec<String> {
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let base = [
        "train",
        "gpt",
        "--data",
        data,
        "--out",
        out,
        "--layers",
        layers,
        "--heads",
        "2",
        "--embed",
        "16",
        "--block-size",
        "16",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--epochs",
        epochs,
        "--quiet",
        "--json",
    ];
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}
