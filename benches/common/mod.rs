//! Helpers shared by the benchmarks: medians, `--flag N` options, and running a PyTorch twin.
// Each benchmark compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;

pub use kiln::recipes::bench::median;

/// The value of `--name N` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value after `name` on the command line, if any.
pub fn string_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs `benches/<script>` with `--reps` and `--train-samples` and returns the JSON object on
/// its last stdout line; `None` (with a note on stderr) when Python or PyTorch is missing or
/// `KILN_BENCH_NO_PYTORCH` is set.
pub fn run_pytorch(script: &str, reps: usize, train_samples: usize) -> Option<Value> {
    run_pytorch_with(
        script,
        &[
            "--reps",
            &reps.to_string(),
            "--train-samples",
            &train_samples.to_string(),
        ],
    )
}

/// Runs `benches/<script>` with `args`, as [`run_pytorch`] does.
pub fn run_pytorch_with(script: &str, args: &[&str]) -> Option<Value> {
    if std::env::var_os("KILN_BENCH_NO_PYTORCH").is_some() {
        return None;
    }
    let path = format!("{}/benches/{script}", env!("CARGO_MANIFEST_DIR"));
    kiln::recipes::bench::run_python_twin(Path::new(&path), args)
        .map_err(|e| eprintln!("PyTorch comparison skipped: {e}"))
        .ok()
}

/// The median over PyTorch twin runs of the number at `key`, or `None` when no run gave one.
pub fn median_field(runs: &[Value], key: &str) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
    (!values.is_empty()).then(|| median(values))
}

/// The machine a benchmark's figures came from: CPU model, the SIMD extensions it has, and the
/// instruction-set levels kiln's kernels, gemm's float kernels and the int8 GEMM ran with.
pub fn machine() -> Value {
    let isa = kiln::kernels::isa::IsaReport::current();
    serde_json::json!({
        "cpu_model": isa.cpu_model,
        "cpu_features": isa.cpu_features,
        "kiln_kernels": isa.kernels.name(),
        "gemm_f32": isa.gemm.name(),
        "int8_gemm": kiln::kernels::int8::Int8Kernel::active().name(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}
