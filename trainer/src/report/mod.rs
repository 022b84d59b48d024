//! What a run tells the user while it runs (progress on stderr) and leaves behind
//! (`metrics.jsonl`, TensorBoard event files).

mod jsonl;
mod progress;
pub mod run_state;
pub mod runs;
pub mod tensorboard;

pub use jsonl::{METRICS_FILE, read_metrics_jsonl, write_metrics_jsonl};
pub use progress::{Progress, Verbosity};

/// Seconds since the Unix epoch (0 on a clock set before it).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, as `run.json` and TensorBoard's file names record it.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}
