//! What a run tells the user while it runs (progress on stderr) and leaves behind
//! (`metrics.jsonl`, TensorBoard event files).

mod jsonl;
mod progress;
pub mod run_state;
pub mod runs;
pub mod tensorboard;

pub use jsonl::{METRICS_FILE, read_metrics_jsonl, write_metrics_jsonl};
pub use progress::{Progress, Verbosity};
