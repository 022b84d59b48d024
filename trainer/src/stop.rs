//! Stopping a run cleanly. SIGTERM and SIGINT (or [`StopSignal::request`]) ask the trainer to
//! finish the optimizer step in progress, agree with the other ranks on that step, write a
//! checkpoint there and return [`TrainError::Stopped`](crate::TrainError::Stopped); the
//! checkpoint resumes exactly, as any other.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use kiln_multi::{Collective, ReduceOp};

use crate::error::Result;

/// The signal number asking this process to stop (0: none), set by the handlers.
static PROCESS_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A process group to kill when a second signal ends this process at once (a launcher's
/// job); 0: none.
static GROUP_ON_SECOND_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A request to stop a run, polled by the trainer after every optimizer step (a group of
/// ranks agrees on it every 4 steps and at each epoch's end).
#[derive(Debug, Clone)]
pub struct StopSignal {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// The process's SIGTERM/SIGINT handlers ([`StopSignal::install_handlers`]).
    Process,
    /// A flag of its own (tests, or a library user's own reason to stop).
    Own(Arc<AtomicI32>),
}

impl StopSignal {
    /// The stop requests of this process: set by the handlers of
    /// [`install_handlers`](Self::install_handlers) (and by [`request`](Self::request) on any
    /// handle of it).
    pub fn process() -> Self {
        Self {
            source: Source::Process,
        }
    }

    /// A signal of its own, which only [`request`](Self::request) sets.
    pub fn new() -> Self {
        Self {
            source: Source::Own(Arc::new(AtomicI32::new(0))),
        }
    }

    /// Asks the run to stop, as if `signal` (e.g. `libc::SIGTERM` = 15) had arrived.
    pub fn request(&self, signal: i32) {
        self.flag().store(signal, Ordering::SeqCst);
    }

    /// The signal that asked to stop, if any.
    pub fn requested(&self) -> Option<i32> {
        let signal = self.flag().load(Ordering::SeqCst);
        (signal != 0).then_some(signal)
    }

    fn flag(&self) -> &AtomicI32 {
        match &self.source {
            Source::Process => &PROCESS_SIGNAL,
            Source::Own(flag) => flag,
        }
    }

    /// Whether this rank's group stops now: the highest signal any rank saw, so that every
    /// rank stops after the same step (one small all-reduce per step).
    pub(crate) fn agreed(&self, group: Option<&dyn Collective>) -> Result<Option<i32>> {
        let local = self.requested().unwrap_or(0);
        let Some(group) = group.filter(|g| g.world_size().get() > 1) else {
            return Ok((local != 0).then_some(local));
        };
        let mut value = [local as f32];
        group.all_reduce(&mut value, ReduceOp::Max)?;
        let signal = value[0] as i32;
        Ok((signal != 0).then_some(signal))
    }

    /// Installs SIGTERM and SIGINT handlers that request a stop of this process's runs; a
    /// second signal while the first is being handled ends the process at once with the
    /// conventional status 128 + signal. SIGUSR1 asks as SIGTERM does: it is how `kiln
    /// launch` passes a stop to its ranks (mpirun forwards SIGUSR1 to every rank, while its
    /// own SIGTERM would kill them a second later).
    ///
    /// # Errors
    /// The operating system's error when a handler cannot be installed.
    #[cfg(unix)]
    pub fn install_handlers() -> std::io::Result<()> {
        Self::install(on_signal)
    }

    /// Also kills process group `group` (a launched job) when a second signal ends this
    /// process at once.
    pub fn kill_group_on_second_signal(group: i32) {
        GROUP_ON_SECOND_SIGNAL.store(group, Ordering::SeqCst);
    }

    #[cfg(unix)]
    fn install(handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
            // SAFETY: `on_signal` only touches an atomic and calls `_exit`, both
            // async-signal-safe; the sigaction struct is fully initialised.
            let installed = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = handler as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if installed != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    let signal = if signal == libc::SIGUSR1 {
        libc::SIGTERM
    } else {
        signal
    };
    if PROCESS_SIGNAL.swap(signal, Ordering::SeqCst) != 0 {
        let group = GROUP_ON_SECOND_SIGNAL.load(Ordering::SeqCst);
        // SAFETY: `kill` and `_exit` are async-signal-safe.
        unsafe {
            if group > 0 {
                libc::kill(-group, libc::SIGKILL);
            }
            libc::_exit(128 + signal)
        };
    }
}

/// A signal's name for messages (`SIGTERM`).
pub fn signal_name(signal: i32) -> String {
    match signal {
        15 => "SIGTERM".into(),
        2 => "SIGINT".into(),
        other => format!("signal {other}"),
    }
}
