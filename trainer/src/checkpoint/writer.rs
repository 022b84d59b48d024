//! Checkpoints written on a background thread: training goes on while the file is
//! checksummed, written, synced and renamed into place (and older files retired), one write
//! at a time, in order. A crash during a write leaves the previous checkpoint intact: the
//! file only appears under its name once complete (`write_atomic`).

use std::thread::JoinHandle;

use crate::error::{Result, TrainError};

/// The checkpoint write in flight, if any.
pub(crate) struct BackgroundWriter {
    pending: Option<JoinHandle<Result<()>>>,
    /// Write on the training thread instead (`--sync-checkpoints`).
    synchronous: bool,
}

impl BackgroundWriter {
    pub(crate) fn new(synchronous: bool) -> Self {
        Self {
            pending: None,
            synchronous,
        }
    }

    /// Waits for the write in flight; its error, if it failed.
    pub(crate) fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(TrainError::Config {
                    field: "checkpoint",
                    reason: "the thread writing it panicked".into(),
                })
            }),
        }
    }

    /// Runs `write` after the write in flight (whose error comes first): on a background
    /// thread, or here when synchronous.
    pub(crate) fn submit(
        &mut self,
        write: impl FnOnce() -> Result<()> + Send + 'static,
    ) -> Result<()> {
        self.wait()?;
        if self.synchronous {
            return write();
        }
        let spawned = std::thread::Builder::new()
            .name("kiln-checkpoint".into())
            .spawn(write)
            .map_err(|e| TrainError::io("start a thread to write", "checkpoint", e))?;
        self.pending = Some(spawned);
        Ok(())
    }
}

impl Drop for BackgroundWriter {
    /// A run ending early (an error elsewhere) still lets the write in flight finish.
    fn drop(&mut self) {
        let _ = self.wait();
    }
}
