//! The in-process engine: ranks are threads of one process and exchange data through shared
//! memory.
//!
//! Every data-moving collective is three steps separated by barriers:
//! 1. *arrive*: each rank publishes pointers to its buffers and waits (bounded by the timeout)
//!    until every rank has arrived with the same operation and length;
//! 2. *work*: rank `r` reads shard `r` of every peer's buffer and writes the result (for
//!    all-reduce, into shard `r` of every peer's buffer: reduce-scatter and all-gather fused
//!    in one pass), so every thread does `1/world` of the arithmetic and of the traffic;
//! 3. *done*: a last barrier keeps each buffer alive until every peer is finished with it.
//!
//! Safety rests on two rules: during a step, the regions one rank writes are disjoint from the
//! regions any rank reads; and no rank returns (which would free or reuse its buffer) while a
//! peer may still read it. Only the *arrive* step can time out: nobody reads anything before
//! everyone has arrived, so giving up there is safe. The later barriers wait until every peer
//! has either finished its (bounded, non-blocking) copy or left the group.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::base::{Collective, CollectiveConfig, ReduceOp, shard_range};
use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// One rank's handle on an in-process group; create them with [`InProcessCollective::group`]
/// or run a closure on every rank with [`run_in_process`].
///
/// Dropping a handle (or the thread holding it panicking) tells the peers that this rank has
/// left: their pending and later collectives fail at once instead of waiting for the timeout.
pub struct InProcessCollective {
    rank: Rank,
    shared: Arc<Shared>,
}

struct Shared {
    world: WorldSize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
    /// The handles of a group being duplicated, one per rank, between the barriers of
    /// [`Collective::duplicate`].
    duplicates: Mutex<Vec<Option<InProcessCollective>>>,
}

struct State {
    /// Incremented every time all ranks have reached the same barrier.
    generation: u64,
    arrived: Vec<bool>,
    count: usize,
    slots: Vec<Slot>,
    /// The slots as they were when the last barrier completed: a rank that wakes late reads
    /// these, since a faster peer may already have published its slot for the next call.
    completed: Vec<Slot>,
    /// Why each rank left, once it has.
    left: Vec<Option<String>>,
    /// Set once the group can no longer run collectives; every later call fails with it.
    failure: Option<String>,
    /// The rank whose failure broke the group, when one rank is to blame.
    culprit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    AllReduce(ReduceOp),
    Broadcast { root: usize },
    AllGather,
    ReduceScatter(ReduceOp),
    Barrier,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce(_) => "all_reduce",
            OpKind::Broadcast { .. } => "broadcast",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter(_) => "reduce_scatter",
            OpKind::Barrier => "barrier",
        }
    }
}

/// What a rank published on arriving at a collective.
#[derive(Debug, Clone, Copy)]
struct Slot {
    kind: OpKind,
    /// The length every rank must agree on (the full buffer, not the shard).
    len: usize,
    /// Where peers read this rank's contribution (and, for all-reduce, write the result:
    /// it then comes from `as_mut_ptr`).
    src: *const f32,
}

// SAFETY: a slot's pointer is dereferenced only between the barriers of the collective that
// published it, while its owner is blocked inside that collective and keeps the buffer alive
// (see the module documentation).
unsafe impl Send for Slot {}

impl Slot {
    const EMPTY: Slot = Slot {
        kind: OpKind::Barrier,
        len: 0,
        src: std::ptr::null(),
    };
}

impl InProcessCollective {
    /// Handles for the `world` ranks of a new group, in rank order; give each to its own thread.
    pub fn group(world: WorldSize, config: CollectiveConfig) -> Vec<InProcessCollective> {
        let n = world.get();
        let shared = Arc::new(Shared {
            world,
            timeout: config.timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: vec![false; n],
                count: 0,
                slots: vec![Slot::EMPTY; n],
                completed: vec![Slot::EMPTY; n],
                left: vec![None; n],
                failure: None,
                culprit: None,
            }),
            wake: Condvar::new(),
            duplicates: Mutex::new(Vec::new()),
        });
        (0..n)
            .map(|r| InProcessCollective {
                rank: Rank::new(r, world).expect("r < world by construction"),
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while this lock is held (no user code runs under it), so a
        // poisoned lock still holds consistent state.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn peer_failed(&self, op: &'static str, reason: String) -> MultiError {
        MultiError::PeerFailed {
            rank: self.rank.index(),
            op,
            reason,
        }
    }

    /// Marks the group failed, so every pending and later call on every rank returns an error.
    fn fail(&self, state: &mut State, reason: String, culprit: Option<usize>) {
        if state.failure.is_none() {
            state.failure = Some(reason);
            state.culprit = culprit;
        }
        self.shared.wake.notify_all();
    }

    fn fail_now(&self, reason: String) {
        let mut state = self.lock();
        self.fail(&mut state, reason, Some(self.rank.index()));
    }

    /// The rank whose failure broke the group, if the group failed because of one rank.
    fn culprit(&self) -> Option<usize> {
        self.lock().culprit
    }

    /// Records that this rank has left the group (returned, failed or panicked); idempotent.
    fn leave(&self, reason: String) {
        let mut state = self.lock();
        let me = self.rank.index();
        if state.left[me].is_none() {
            state.left[me] = Some(reason);
        }
        self.shared.wake.notify_all();
    }

    /// Why the group cannot run a collective now, if it cannot.
    fn broken(&self, state: &mut State) -> Option<String> {
        if let Some(reason) = &state.failure {
            return Some(reason.clone());
        }
        let (peer, why) = state
            .left
            .iter()
            .enumerate()
            .find_map(|(r, why)| why.as_ref().map(|w| (r, w.clone())))?;
        let reason = format!("rank {peer} {why}");
        self.fail(state, reason.clone(), Some(peer));
        Some(reason)
    }

    /// Marks this rank arrived; returns the generation to wait past, or `None` if it was the
    /// last to arrive (the barrier is then already complete).
    fn arrive(&self, state: &mut State) -> Option<u64> {
        let me = self.rank.index();
        state.arrived[me] = true;
        state.count += 1;
        if state.count == self.shared.world.get() {
            state.count = 0;
            state.completed = state.slots.clone();
            state.arrived.iter_mut().for_each(|a| *a = false);
            state.generation += 1;
            self.shared.wake.notify_all();
            None
        } else {
            Some(state.generation)
        }
    }

    /// Publishes this rank's slot and waits, up to the timeout, until every rank has arrived.
    /// Returns every rank's slot once all agree on the operation and length.
    fn enter(&self, kind: OpKind, len: usize, src: *const f32) -> Result<Vec<Slot>> {
        let op = kind.name();
        let mut state = self.lock();
        if let Some(reason) = self.broken(&mut state) {
            return Err(self.peer_failed(op, reason));
        }
        state.slots[self.rank.index()] = Slot { kind, len, src };
        if let Some(generation) = self.arrive(&mut state) {
            let deadline = Instant::now() + self.shared.timeout;
            loop {
                let now = Instant::now();
                let (guard, _) = self
                    .shared
                    .wake
                    .wait_timeout(state, deadline.saturating_duration_since(now))
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                state = guard;
                if state.generation != generation {
                    break;
                }
                if let Some(reason) = self.broken(&mut state) {
                    return Err(self.peer_failed(op, reason));
                }
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..self.shared.world.get())
                        .filter(|&r| !state.arrived[r])
                        .collect();
                    let reason = format!(
                        "rank {} timed out in {op} after {:?} waiting for rank(s) {missing:?}",
                        self.rank.index(),
                        self.shared.timeout
                    );
                    self.fail(&mut state, reason, Some(self.rank.index()));
                    return Err(MultiError::Timeout {
                        rank: self.rank.index(),
                        op,
                        timeout: self.shared.timeout,
                        missing,
                    });
                }
            }
        }
        // No barrier completes again before this rank arrives at the next one, so these are
        // the slots of this collective.
        let slots = state.completed.clone();
        if let Some(detail) = disagreement(&slots) {
            let reason = format!("ranks called different collectives: {detail}");
            self.fail(&mut state, reason, None);
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail,
            });
        }
        Ok(slots)
    }

    /// Waits until every rank has finished the current step of a collective. No timeout: all
    /// ranks are past [`enter`](Self::enter), so each either finishes a bounded copy and
    /// arrives, or has left; returning before then could free a buffer a peer still reads.
    fn step_done(&self, op: &'static str) -> Result<()> {
        let mut state = self.lock();
        let Some(generation) = self.arrive(&mut state) else {
            return Ok(());
        };
        loop {
            let (guard, _) = self
                .shared
                .wake
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = guard;
            if state.generation != generation {
                return Ok(());
            }
            let all_accounted =
                (0..self.shared.world.get()).all(|r| state.arrived[r] || state.left[r].is_some());
            if all_accounted {
                let reason = self
                    .broken(&mut state)
                    .unwrap_or_else(|| "a peer left during the collective".to_string());
                return Err(self.peer_failed(op, reason));
            }
        }
    }

    fn check_len(&self, op: &'static str, expected: usize, got: usize) -> Result<()> {
        if expected == got {
            return Ok(());
        }
        self.fail_now(format!(
            "rank {} passed a buffer of {got} elements to {op}, expected {expected}",
            self.rank.index()
        ));
        Err(MultiError::BufferLength {
            rank: self.rank.index(),
            op,
            expected,
            got,
        })
    }

    fn shard(&self, len: usize, rank: usize) -> std::ops::Range<usize> {
        let world = self.shared.world;
        shard_range(len, world, Rank::new(rank, world).expect("rank < world"))
    }
}

/// Which field the ranks' slots disagree on, if any.
fn disagreement(slots: &[Slot]) -> Option<String> {
    let first = slots.first()?;
    slots.iter().enumerate().skip(1).find_map(|(r, s)| {
        (s.kind != first.kind || s.len != first.len).then(|| {
            format!(
                "rank 0 called {:?} on {} elements, rank {r} called {:?} on {} elements",
                first.kind, first.len, s.kind, s.len
            )
        })
    })
}

/// Elements reduced per block: small enough for the accumulator to stay in L1.
const BLOCK: usize = 2048;

/// Writes the element-wise reduction of `len` elements from every source into every
/// destination, adding sources in rank order so that the result has the same bits wherever
/// it is computed.
///
/// # Safety
/// Every source must be valid for `len` reads and every destination for `len` writes, and no
/// other thread may access these regions meanwhile. A destination may equal a source: each
/// block is read from all sources before it is written.
unsafe fn reduce_into(destinations: &[*mut f32], sources: &[*const f32], len: usize, op: ReduceOp) {
    let mut acc = [0f32; BLOCK];
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let acc = &mut acc[..n];
        // SAFETY: within the bounds the caller guarantees.
        let source = |k: usize| unsafe { std::slice::from_raw_parts(sources[k].add(start), n) };
        // Two sources are combined in one pass: the common two-rank case.
        match (op, sources.len()) {
            (ReduceOp::Sum | ReduceOp::Avg, 2..) => {
                let (a, b) = (source(0), source(1));
                acc.iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(t, (x, y))| *t = x + y);
            }
            (ReduceOp::Max, 2..) => {
                let (a, b) = (source(0), source(1));
                acc.iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(t, (x, y))| *t = x.max(*y));
            }
            _ => acc.copy_from_slice(source(0)),
        }
        for k in 2..sources.len() {
            let src = source(k);
            match op {
                ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(src).for_each(|(a, b)| *a += b),
                ReduceOp::Max => acc.iter_mut().zip(src).for_each(|(a, b)| *a = a.max(*b)),
            }
        }
        if op == ReduceOp::Avg {
            let n_ranks = sources.len() as f32;
            acc.iter_mut().for_each(|a| *a /= n_ranks);
        }
        for dst in destinations {
            // SAFETY: `dst` is valid for `len` writes; the block was read from every source
            // (one of which may be this destination) before this write.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.add(start), n) };
        }
        start += n;
    }
}

impl Collective for InProcessCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> WorldSize {
        self.shared.world
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let (len, me) = (buf.len(), self.rank.index());
        let ptr = buf.as_mut_ptr();
        let slots = self.enter(OpKind::AllReduce(op), len, ptr)?;
        // Reduce-scatter and all-gather in one pass: rank r reduces shard r of every buffer
        // and writes the result straight into shard r of every buffer.
        let mine = self.shard(len, me);
        let sources: Vec<*const f32> = slots
            .iter()
            .map(|s| s.src.wrapping_add(mine.start))
            .collect();
        let destinations: Vec<*mut f32> = slots
            .iter()
            .map(|s| s.src.cast_mut().wrapping_add(mine.start))
            .collect();
        // SAFETY: every peer is blocked in this all_reduce until `step_done` with a buffer of
        // `len` elements, published from a `&mut [f32]`; shard r of every buffer is read and
        // written by rank r alone, so the ranks' regions are disjoint.
        unsafe { reduce_into(&destinations, &sources, mine.len(), op) };
        self.step_done("all_reduce")
    }

    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        if root.index() >= self.shared.world.get() {
            return Err(MultiError::RankOutOfRange {
                rank: root.index(),
                world_size: self.shared.world.get(),
            });
        }
        let ptr = buf.as_mut_ptr();
        let slots = self.enter(OpKind::Broadcast { root: root.index() }, buf.len(), ptr)?;
        if root != self.rank {
            // SAFETY: the root is blocked in this broadcast and does not write its buffer;
            // this rank writes only its own.
            unsafe { std::ptr::copy_nonoverlapping(slots[root.index()].src, ptr, buf.len()) };
        }
        self.step_done("broadcast")
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let name = "all_gather";
        let mine = self.shard(out.len(), self.rank.index());
        self.check_len(name, mine.len(), shard.len())?;
        let ptr = out.as_mut_ptr();
        let slots = self.enter(OpKind::AllGather, out.len(), shard.as_ptr())?;
        for (peer, slot) in slots.iter().enumerate() {
            let theirs = self.shard(out.len(), peer);
            // SAFETY: peers' shards are read-only; this rank writes only its own `out`.
            unsafe { std::ptr::copy_nonoverlapping(slot.src, ptr.add(theirs.start), theirs.len()) };
        }
        self.step_done(name)
    }

    fn reduce_scatter(&self, buf: &[f32], shard: &mut [f32], op: ReduceOp) -> Result<()> {
        let name = "reduce_scatter";
        let mine = self.shard(buf.len(), self.rank.index());
        self.check_len(name, mine.len(), shard.len())?;
        let slots = self.enter(OpKind::ReduceScatter(op), buf.len(), buf.as_ptr())?;
        let sources: Vec<*const f32> = slots
            .iter()
            .map(|s| s.src.wrapping_add(mine.start))
            .collect();
        // SAFETY: inputs are read-only for the whole collective; `shard` is this rank's own.
        unsafe { reduce_into(&[shard.as_mut_ptr()], &sources, mine.len(), op) };
        self.step_done(name)
    }

    fn barrier(&self) -> Result<()> {
        self.enter(OpKind::Barrier, 0, std::ptr::null()).map(|_| ())
    }

    fn duplicate(&self) -> Result<Arc<dyn Collective>> {
        let lock = || {
            self.shared
                .duplicates
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        // Everyone is here; rank 0 makes the group; everyone takes its handle; and no rank
        // leaves (to duplicate again) before all have.
        self.barrier()?;
        if self.rank == Rank::ZERO {
            let config = CollectiveConfig {
                timeout: self.shared.timeout,
            };
            *lock() = InProcessCollective::group(self.shared.world, config)
                .into_iter()
                .map(Some)
                .collect();
        }
        self.barrier()?;
        let handle = lock()
            .get_mut(self.rank.index())
            .and_then(Option::take)
            .ok_or_else(|| MultiError::Config {
                field: "collective",
                reason: "a duplicated group lost this rank's handle".into(),
            })?;
        self.barrier()?;
        Ok(Arc::new(handle))
    }
}

impl Drop for InProcessCollective {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            "panicked"
        } else {
            "left the group (its handle was dropped)"
        };
        self.leave(reason.to_string());
    }
}

/// Runs `f` once per rank of a new in-process group, each on its own thread, and returns the
/// ranks' results in rank order.
///
/// When some rank fails, its peers' collectives fail too; the error returned is that of the
/// rank that broke the group (the one that failed, panicked or timed out first), which names
/// the cause rather than its echoes on other ranks. A panic is
/// caught and returned as [`MultiError::RankPanicked`]. A rank that never returns (an endless
/// loop outside any collective) is waited for, although its peers fail within the timeout.
///
/// # Errors
/// The earliest error (or panic) of any rank.
pub fn run_in_process<T, E, F>(
    world: WorldSize,
    config: CollectiveConfig,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    F: Fn(Arc<dyn Collective>) -> std::result::Result<T, E> + Sync,
    T: Send,
    E: Send + From<MultiError>,
{
    let handles: Vec<Arc<InProcessCollective>> = InProcessCollective::group(world, config)
        .into_iter()
        .map(Arc::new)
        .collect();
    let outcomes: Vec<(Instant, std::result::Result<T, E>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = handles
            .iter()
            .map(|handle| {
                let (handle, f) = (Arc::clone(handle), &f);
                std::thread::Builder::new()
                    .name(format!("kiln-rank-{}", handle.rank.index()))
                    .spawn_scoped(scope, move || {
                        let rank = handle.rank.index();
                        let as_dyn: Arc<dyn Collective> = handle.clone();
                        let outcome = catch_unwind(AssertUnwindSafe(|| f(as_dyn)));
                        let done = Instant::now();
                        let (result, why) = match outcome {
                            Ok(Ok(value)) => (Ok(value), "finished"),
                            Ok(Err(e)) => (Err(e), "failed"),
                            Err(payload) => {
                                let message = panic_message(payload.as_ref());
                                (
                                    Err(MultiError::RankPanicked { rank, message }.into()),
                                    "panicked",
                                )
                            }
                        };
                        handle.leave(why.to_string());
                        (done, result)
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        threads
            .into_iter()
            .enumerate()
            .map(|(rank, t)| {
                t.join().unwrap_or_else(|payload| {
                    let message = panic_message(payload.as_ref());
                    (
                        Instant::now(),
                        Err(MultiError::RankPanicked { rank, message }.into()),
                    )
                })
            })
            .collect()
    });
    let culprit = handles
        .first()
        .and_then(|h| h.culprit())
        .filter(|&r| outcomes[r].1.is_err());
    let first_failure = culprit.or_else(|| {
        outcomes
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| r.is_err())
            .min_by_key(|(_, (at, _))| *at)
            .map(|(rank, _)| rank)
    });
    let mut results = Vec::with_capacity(outcomes.len());
    let mut root_cause = None;
    for (rank, (_, result)) in outcomes.into_iter().enumerate() {
        match result {
            Ok(value) => results.push(value),
            Err(e) if Some(rank) == first_failure => root_cause = Some(e),
            Err(_) => {}
        }
    }
    match root_cause {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_string())
}
