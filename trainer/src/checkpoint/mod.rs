//! Checkpoints: what they hold ([`TrainerState`] plus model and optimizer records), how they
//! are written (atomically, with checksums) and how a run finds its latest one.

mod base;
mod file;
mod resume;
mod retention;
mod writer;

pub use base::{Checkpoint, EpochMetrics, MidEpoch, TrainerState};
pub(crate) use file::write_atomic as file_write_atomic;
pub use file::{read_checkpoint, write_atomic, write_checkpoint_atomic};
pub use resume::{
    CHECKPOINT_DIR, checkpoint_path, latest_checkpoint, load_latest, resolve_checkpoint,
    step_checkpoint_path,
};
pub(crate) use resume::{checkpoint_position, list_checkpoints};
pub(crate) use retention::apply as apply_retention;
pub use retention::{KeepBest, Retention};
pub(crate) use writer::BackgroundWriter;
