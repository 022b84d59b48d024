//! The MPI engine: one rank per process, on one host or many, over Open MPI.
//!
//! A process joins the job with [`MpiSession::init`] (MPI is initialised once per process) and
//! gets an [`MpiCollective`] on a private duplicate of `MPI_COMM_WORLD`. Data moves with MPI's
//! own blocking collectives (`MPI_Allreduce` in place, `MPI_Bcast`, `MPI_Allgatherv`,
//! `MPI_Reduce_scatter`, `MPI_Barrier`), which pick shared memory or TCP by themselves.
//!
//! MPI cannot cancel a collective, and a job whose ranks disagree about which collective comes
//! next cannot recover, so failures end the whole job instead of returning to the caller:
//! - every call is bounded by the timeout: a watchdog thread prints which rank gave up on
//!   which collective and calls `MPI_Abort`, which makes `mpirun` stop every rank;
//! - a panic prints its message and aborts the job the same way (a plain exit would leave the
//!   peers blocked in their next collective);
//! - a process that dies (`kill -9`) is noticed by `mpirun`, which stops the others.
//!
//! What can be detected before any data moves *is* returned as an error on every rank: before
//! each call the ranks exchange a small header (operation, length, root, and whether this
//! rank's own arguments are valid), so a length or operation mismatch, or a shard of the wrong
//! length on one rank, gives an error on every rank instead of silent truncation or a hang
//! (`examples/mpi_errors.rs` shows it, and the job goes on).
//! [`MpiSession::run`] ends a job cleanly: `MPI_Finalize` when the closure succeeds, a message
//! and `MPI_Abort` when it fails (finalising with a peer still inside a collective would hang).

use std::ffi::{c_char, c_int, c_void};
use std::fmt::Display;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mpi::environment::{Threading, Universe};
use mpi::ffi;

use super::base::{Collective, CollectiveConfig, ReduceOp, shard_range};
use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// `MPI_IN_PLACE` as Open MPI's `mpi.h` defines it (`(void *) 1`); the `mpi` crate does not
/// export it. Used only once the library has been checked to be Open MPI.
const OPEN_MPI_IN_PLACE: *mut c_void = std::ptr::without_provenance_mut(1);

/// The exit code of a job aborted by kiln (a failed rank, a timeout, a panic).
pub const ABORT_EXIT_CODE: i32 = 1;

/// The process's MPI state: initialised at most once, finalised at most once.
static SESSION: OnceLock<SessionState> = OnceLock::new();

struct SessionState {
    /// Dropping the universe calls `MPI_Finalize`; taken out by [`MpiSession::finalize`].
    universe: Mutex<Option<Universe>>,
    /// The communicator used for aborting from the watchdog or the panic hook.
    comm: RawComm,
    rank: usize,
    /// `MPI_Abort` may be called from any thread (the library provides `MPI_THREAD_MULTIPLE`).
    abort_from_any_thread: bool,
}

/// An MPI communicator handle; Open MPI's handles are pointers to process-lifetime objects.
#[derive(Clone, Copy)]
struct RawComm(ffi::MPI_Comm);

// SAFETY: the handle is an immutable pointer to a communicator that lives until
// `MPI_Finalize`; calls through it are serialised by `MpiCollective::calls`, and the abort
// paths only run with a thread level that allows them (`abort_from_any_thread`).
unsafe impl Send for RawComm {}
// SAFETY: as above.
unsafe impl Sync for RawComm {}

/// This process's membership of an MPI job; see the [module docs](self).
pub struct MpiSession {
    collective: Arc<MpiCollective>,
    finished: bool,
}

impl MpiSession {
    /// Initialises MPI (asking for `MPI_THREAD_MULTIPLE`), duplicates `MPI_COMM_WORLD` for
    /// kiln's collectives, installs the panic hook and starts the timeout watchdog.
    ///
    /// Run as a single process (not under `mpirun`), this is a world of one rank.
    ///
    /// # Errors
    /// [`MultiError::Config`] when MPI was already initialised in this process or the library
    /// fails to set up the communicator.
    pub fn init(config: CollectiveConfig) -> Result<Self> {
        let mpi_error = |reason: String| MultiError::Config {
            field: "MPI",
            reason,
        };
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| {
                mpi_error(
                    "MPI is already initialised in this process (one session per process)".into(),
                )
            })?;
        let library = library_version();
        if !library.contains("Open MPI") {
            return Err(mpi_error(format!(
                "kiln's MPI engine supports Open MPI only; this process runs {library}"
            )));
        }
        let mut comm = ffi::MPI_Comm(std::ptr::null_mut());
        // SAFETY: MPI is initialised; `comm` is a valid out-pointer.
        check(
            unsafe { ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm) },
            0,
            "init",
        )
        .map_err(|e| mpi_error(e.to_string()))?;
        // SAFETY: `comm` was just created; errors on it now come back as return codes.
        check(
            unsafe { ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN) },
            0,
            "init",
        )
        .map_err(|e| mpi_error(e.to_string()))?;
        let (rank, world) = place(comm)?;
        let state = SessionState {
            universe: Mutex::new(Some(universe)),
            comm: RawComm(comm),
            rank: rank.index(),
            abort_from_any_thread: threading == Threading::Multiple,
        };
        if SESSION.set(state).is_err() {
            return Err(mpi_error("MPI session state already set".into()));
        }
        install_panic_hook();
        let collective = Arc::new(MpiCollective::on(
            comm,
            (rank, world),
            config.timeout,
            library,
        ));
        Ok(Self {
            collective,
            finished: false,
        })
    }

    /// The collective of this job, for [`DistributedDataParallel`](crate::DistributedDataParallel)
    /// or direct use.
    pub fn collective(&self) -> Arc<MpiCollective> {
        Arc::clone(&self.collective)
    }

    /// Runs `job` on this rank and ends the MPI session as its result says: on success, waits
    /// for every rank and finalises MPI, returning the value; on failure, prints
    /// `rank R: error: ...` on stderr and aborts the whole job with exit code
    /// [`ABORT_EXIT_CODE`], since the peers may be waiting in a collective that will never
    /// complete.
    ///
    /// # Errors
    /// [`MultiError`] when finalising fails after a successful job.
    pub fn run<T, E: Display>(
        self,
        job: impl FnOnce(Arc<MpiCollective>) -> std::result::Result<T, E>,
    ) -> Result<T> {
        match job(self.collective()) {
            Ok(value) => {
                self.finalize()?;
                Ok(value)
            }
            Err(e) => {
                let rank = self.collective.rank.index();
                abort_job(&format!("rank {rank}: error: {e:#}"))
            }
        }
    }

    /// Waits for every rank (bounded by the timeout) and finalises MPI.
    ///
    /// # Errors
    /// A failed or timed-out final barrier aborts the job as any collective does.
    pub fn finalize(mut self) -> Result<()> {
        self.collective.barrier()?;
        self.finished = true;
        if let Some(state) = SESSION.get() {
            let universe = lock(&state.universe).take();
            drop(universe); // MPI_Finalize
        }
        Ok(())
    }
}

impl Drop for MpiSession {
    /// A session dropped without [`finalize`](Self::finalize) (an error path that did not go
    /// through [`run`](Self::run)) aborts the job rather than hang in `MPI_Finalize`.
    fn drop(&mut self) {
        if !self.finished {
            let rank = self.collective.rank.index();
            abort_job(&format!(
                "rank {rank}: leaving the MPI job without finishing it; aborting every rank"
            ));
        }
    }
}

/// One rank's handle on the MPI job; get it from [`MpiSession::collective`].
pub struct MpiCollective {
    comm: RawComm,
    rank: Rank,
    world: WorldSize,
    timeout: Duration,
    /// Collectives of one rank run one at a time, in call order.
    calls: Mutex<()>,
    watchdog: Arc<Watchdog>,
    library: String,
}

impl MpiCollective {
    /// A handle on `comm`, where this process is `place` (rank, size), with a watchdog of its
    /// own.
    fn on(
        comm: ffi::MPI_Comm,
        (rank, world): (Rank, WorldSize),
        timeout: Duration,
        library: String,
    ) -> Self {
        Self {
            comm: RawComm(comm),
            rank,
            world,
            timeout,
            calls: Mutex::new(()),
            watchdog: Watchdog::start(rank.index(), world.get()),
            library,
        }
    }

    /// The MPI library's version string, e.g. `Open MPI v4.1.4, ...`.
    pub fn library_version(&self) -> &str {
        &self.library
    }

    /// Checks that every rank calls the same operation with the same length (and root) and
    /// that no rank found its own arguments wrong (`local`), then runs `body` under the
    /// watchdog. A rank with bad arguments still takes part in the check, so that its peers
    /// fail with it instead of waiting for it.
    fn call(
        &self,
        op: &'static str,
        kind: i64,
        len: usize,
        root: usize,
        local: Result<()>,
        body: impl FnOnce() -> c_int,
    ) -> Result<()> {
        let _serial = lock(&self.calls);
        let _armed = self.watchdog.arm(op, self.timeout);
        let mine = [kind, len as i64, root as i64, i64::from(local.is_err())];
        // The maximum of each field and of its negation: the fields agree when max == min.
        let mut agreed = [0i64; 8];
        for (i, &v) in mine.iter().enumerate() {
            (agreed[i], agreed[i + 4]) = (v, -v);
        }
        // SAFETY: `agreed` is a valid buffer of 8 i64 on every rank; in place.
        let code = unsafe {
            ffi::MPI_Allreduce(
                OPEN_MPI_IN_PLACE,
                agreed.as_mut_ptr().cast(),
                8,
                ffi::RSMPI_INT64_T,
                ffi::RSMPI_MAX,
                self.comm.0,
            )
        };
        check(code, self.rank.index(), op)?;
        let max = &agreed[..4];
        let min: Vec<i64> = agreed[4..].iter().map(|v| -v).collect();
        if max[..3] != min[..3] {
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail: format!(
                    "this rank called {} with {} elements (root {}); some rank called operation \
                     code(s) {}..={} with {}..={} elements, roots {}..={}",
                    op, mine[1], mine[2], min[0], max[0], min[1], max[1], min[2], max[2]
                ),
            });
        }
        local?;
        if max[3] != 0 {
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail: "another rank passed a buffer of the wrong length".to_string(),
            });
        }
        check(body(), self.rank.index(), op)
    }

    /// Counts and displacements of the ranks' shards of `len` elements, as MPI's `int`s, and
    /// whether this rank's `shard_len` and `len` itself are valid.
    #[allow(clippy::type_complexity)]
    fn shard_layout(
        &self,
        op: &'static str,
        len: usize,
        shard_len: usize,
    ) -> ((Vec<c_int>, Vec<c_int>), Result<()>) {
        let ranges: Vec<_> = (0..self.world.get())
            .map(|r| {
                shard_range(
                    len,
                    self.world,
                    Rank::new(r, self.world).expect("r < world"),
                )
            })
            .collect();
        let expected = ranges[self.rank.index()].len();
        let valid = if c_int::try_from(len).is_err() {
            Err(MultiError::Config {
                field: "buffer length",
                reason: format!(
                    "{op} of {len} elements exceeds MPI's int counts ({})",
                    c_int::MAX
                ),
            })
        } else if shard_len != expected {
            Err(MultiError::BufferLength {
                rank: self.rank.index(),
                op,
                expected,
                got: shard_len,
            })
        } else {
            Ok(())
        };
        // Truncating casts only when `valid` is an error, in which case nothing is sent.
        let layout = ranges
            .iter()
            .map(|range| (range.len() as c_int, range.start as c_int))
            .unzip();
        (layout, valid)
    }
}

/// Operation codes exchanged in the header (any distinct values).
const ALL_REDUCE: i64 = 1;
const BROADCAST: i64 = 2;
const ALL_GATHER: i64 = 3;
const REDUCE_SCATTER: i64 = 4;
const BARRIER: i64 = 5;
const DUPLICATE: i64 = 6;
const SPLIT: i64 = 7;

/// Elements per MPI call for broadcasts, below `c_int::MAX`.
const CHUNK: usize = 1 << 30;

/// Elements per `MPI_Allreduce` call: 1 MiB pieces stay in cache while Open MPI copies them
/// through shared memory and reduces them. Measured with `kiln collectives --bench` on 2
/// ranks (2-core VM, vader): a 64 MiB all-reduce took 59 ms in one call, 25 ms in 1 MiB
/// pieces (28 ms in 256 KiB, 34 ms in 16 MiB ones).
const ALL_REDUCE_CHUNK: usize = 1 << 18;

fn op_code(base: i64, op: ReduceOp) -> i64 {
    base * 10
        + match op {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
        }
}

fn mpi_op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: reading MPI's predefined handles after initialisation.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> WorldSize {
        self.world
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let len = buf.len();
        self.call(
            "all_reduce",
            op_code(ALL_REDUCE, op),
            len,
            0,
            Ok(()),
            || {
                for chunk in buf.chunks_mut(ALL_REDUCE_CHUNK) {
                    // SAFETY: `chunk` is a valid, exclusive f32 buffer of `chunk.len()` elements
                    // (< c_int::MAX); every rank passes the same length (checked by the header).
                    let code = unsafe {
                        ffi::MPI_Allreduce(
                            OPEN_MPI_IN_PLACE,
                            chunk.as_mut_ptr().cast(),
                            chunk.len() as c_int,
                            ffi::RSMPI_FLOAT,
                            mpi_op(op),
                            self.comm.0,
                        )
                    };
                    if code != 0 {
                        return code;
                    }
                }
                0
            },
        )?;
        if op == ReduceOp::Avg {
            let n = self.world.get() as f32;
            buf.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        self.call(
            "broadcast",
            BROADCAST,
            buf.len(),
            root.index(),
            Ok(()),
            || {
                for chunk in buf.chunks_mut(CHUNK) {
                    // SAFETY: valid exclusive buffer; same length and root on every rank.
                    let code = unsafe {
                        ffi::MPI_Bcast(
                            chunk.as_mut_ptr().cast(),
                            chunk.len() as c_int,
                            ffi::RSMPI_FLOAT,
                            root.index() as c_int,
                            self.comm.0,
                        )
                    };
                    if code != 0 {
                        return code;
                    }
                }
                0
            },
        )
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let op = "all_gather";
        let (layout, local) = self.shard_layout(op, out.len(), shard.len());
        self.call(op, ALL_GATHER, out.len(), 0, local, || {
            let (counts, displs) = &layout;
            // SAFETY: `shard` holds this rank's count; `out` holds the sum of all counts at the
            // given displacements; lengths agree on every rank (header).
            unsafe {
                ffi::MPI_Allgatherv(
                    shard.as_ptr().cast(),
                    shard.len() as c_int,
                    ffi::RSMPI_FLOAT,
                    out.as_mut_ptr().cast(),
                    counts.as_ptr(),
                    displs.as_ptr(),
                    ffi::RSMPI_FLOAT,
                    self.comm.0,
                )
            }
        })
    }

    fn reduce_scatter(&self, buf: &[f32], shard: &mut [f32], op: ReduceOp) -> Result<()> {
        let name = "reduce_scatter";
        let ((counts, _), local) = self.shard_layout(name, buf.len(), shard.len());
        self.call(
            name,
            op_code(REDUCE_SCATTER, op),
            buf.len(),
            0,
            local,
            || {
                // SAFETY: `buf` holds the sum of all counts; `shard` this rank's count.
                unsafe {
                    ffi::MPI_Reduce_scatter(
                        buf.as_ptr().cast(),
                        shard.as_mut_ptr().cast(),
                        counts.as_ptr(),
                        ffi::RSMPI_FLOAT,
                        mpi_op(op),
                        self.comm.0,
                    )
                }
            },
        )?;
        if op == ReduceOp::Avg {
            let n = self.world.get() as f32;
            shard.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.call("barrier", BARRIER, 0, 0, Ok(()), || {
            // SAFETY: valid communicator.
            unsafe { ffi::MPI_Barrier(self.comm.0) }
        })
    }

    /// `MPI_Comm_dup` (which keeps the error handler), with a watchdog of its own, so the
    /// duplicate's collectives may run at the same time as this group's on other threads
    /// (the session asks for `MPI_THREAD_MULTIPLE`).
    fn duplicate(&self) -> Result<Arc<dyn Collective>> {
        let mut comm = ffi::MPI_Comm(std::ptr::null_mut());
        self.call("duplicate", DUPLICATE, 0, 0, Ok(()), || {
            // SAFETY: valid communicator and out-pointer.
            unsafe { ffi::MPI_Comm_dup(self.comm.0, &mut comm) }
        })?;
        let place = (self.rank, self.world);
        let library = self.library.clone();
        Ok(Arc::new(MpiCollective::on(
            comm,
            place,
            self.timeout,
            library,
        )))
    }

    /// `MPI_Comm_split`, with a watchdog of its own.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Collective>> {
        let too_large = |what: &str| MultiError::Config {
            field: "MPI",
            reason: format!("a group split's {what} does not fit an MPI int"),
        };
        let color = c_int::try_from(color).map_err(|_| too_large("color"))?;
        let key = c_int::try_from(key).map_err(|_| too_large("key"))?;
        let mut comm = ffi::MPI_Comm(std::ptr::null_mut());
        self.call("split", SPLIT, 0, 0, Ok(()), || {
            // SAFETY: valid communicator and out-pointer.
            unsafe { ffi::MPI_Comm_split(self.comm.0, color, key, &mut comm) }
        })?;
        let library = self.library.clone();
        Ok(Arc::new(MpiCollective::on(
            comm,
            place(comm)?,
            self.timeout,
            library,
        )))
    }
}

/// This process's rank in `comm` and the communicator's size.
fn place(comm: ffi::MPI_Comm) -> Result<(Rank, WorldSize)> {
    let (mut rank, mut size) = (0, 0);
    // SAFETY: a valid communicator and out-pointers.
    unsafe {
        ffi::MPI_Comm_rank(comm, &mut rank);
        ffi::MPI_Comm_size(comm, &mut size);
    }
    let world = WorldSize::new(size as usize)?;
    Ok((Rank::new(rank as usize, world)?, world))
}

/// Turns an MPI return code into [`MultiError::PeerFailed`] with MPI's own message.
fn check(code: c_int, rank: usize, op: &'static str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let mut text = vec![0 as c_char; 1024];
    let mut len: c_int = 0;
    // SAFETY: the buffer is larger than MPI_MAX_ERROR_STRING (256 in Open MPI).
    unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr(), &mut len) };
    let bytes: Vec<u8> = text[..len.max(0) as usize]
        .iter()
        .map(|&c| c as u8)
        .collect();
    Err(MultiError::PeerFailed {
        rank,
        op,
        reason: format!("MPI error {code}: {}", String::from_utf8_lossy(&bytes)),
    })
}

fn library_version() -> String {
    let mut text = vec![0 as c_char; 8192];
    let mut len: c_int = 0;
    // SAFETY: the buffer is larger than MPI_MAX_LIBRARY_VERSION_STRING.
    unsafe { ffi::MPI_Get_library_version(text.as_mut_ptr(), &mut len) };
    let bytes: Vec<u8> = text[..len.max(0) as usize]
        .iter()
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\0')
        .to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Prints `message` on stderr and stops every rank of the job with `MPI_Abort`.
fn abort_job(message: &str) -> ! {
    static ABORTING: AtomicBool = AtomicBool::new(false);
    if !ABORTING.swap(true, Ordering::SeqCst) {
        let _ = std::io::stdout().flush();
        let _ = writeln!(std::io::stderr(), "{message}");
    }
    if let Some(state) = SESSION.get()
        && state.abort_from_any_thread
    {
        // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE, so any thread may abort.
        unsafe { ffi::MPI_Abort(state.comm.0, ABORT_EXIT_CODE) };
    }
    // Without MPI_THREAD_MULTIPLE (or if MPI_Abort returned): a non-zero exit without
    // MPI_Finalize, which mpirun also treats as a failed job.
    std::process::exit(ABORT_EXIT_CODE)
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let rank = SESSION.get().map_or(0, |s| s.rank);
        abort_job(&format!(
            "rank {rank} panicked; aborting every rank of the MPI job"
        ));
    }));
}

/// Aborts the job when a collective runs past its timeout.
struct Watchdog {
    rank: usize,
    world: usize,
    armed: Mutex<Option<(&'static str, Duration, Instant)>>,
    wake: Condvar,
}

/// Disarms the watchdog when the collective returns.
struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        *lock(&self.0.armed) = None;
    }
}

impl Watchdog {
    fn start(rank: usize, world: usize) -> Arc<Self> {
        let watchdog = Arc::new(Self {
            rank,
            world,
            armed: Mutex::new(None),
            wake: Condvar::new(),
        });
        let watched = Arc::clone(&watchdog);
        std::thread::Builder::new()
            .name("kiln-mpi-watchdog".into())
            .spawn(move || watched.watch())
            .expect("spawning the MPI watchdog thread");
        watchdog
    }

    fn arm(&self, op: &'static str, timeout: Duration) -> Armed<'_> {
        *lock(&self.armed) = Some((op, timeout, Instant::now() + timeout));
        self.wake.notify_one();
        Armed(self)
    }

    fn watch(&self) {
        let mut armed = lock(&self.armed);
        loop {
            match *armed {
                None => armed = self.wake.wait(armed).unwrap_or_else(|p| p.into_inner()),
                Some((op, timeout, deadline)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(armed);
                        // MPI does not say which peer is late; with one peer, it is that one.
                        let peers = match self.world {
                            2 => format!("rank {} is", 1 - self.rank),
                            _ => "one of the other ranks is".to_string(),
                        };
                        abort_job(&format!(
                            "rank {}: {op} timed out after {timeout:?}: {peers} stalled, dead or \
                             calling a different collective; aborting every rank",
                            self.rank
                        ));
                    }
                    armed = self
                        .wake
                        .wait_timeout(armed, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}
