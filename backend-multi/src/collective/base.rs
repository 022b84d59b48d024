use std::ops::Range;
use std::time::Duration;

use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// How an all-reduce or reduce-scatter combines the ranks' values, element by element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The mean over ranks (the sum divided by the world size).
    Avg,
    /// The largest value over ranks.
    Max,
}

/// Settings shared by every collective of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectiveConfig {
    /// How long a rank waits for its peers to reach the same collective before it gives up
    /// with [`MultiError::Timeout`](crate::MultiError::Timeout).
    pub timeout: Duration,
}

impl CollectiveConfig {
    /// The default timeout: long enough for rank 0 to evaluate and write a checkpoint while
    /// the others wait at their next collective, short enough to notice a dead peer.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
}

impl Default for CollectiveConfig {
    fn default() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// Collective communication between the ranks of a group.
///
/// Every rank calls the same collectives in the same order with compatible buffers. Every call
/// blocks until all ranks have joined it, and is bounded by the group's timeout: a peer that
/// never arrives, has failed, or has dropped its handle makes the call return an error on
/// every rank instead of hanging.
///
/// Sharded calls ([`all_gather`](Collective::all_gather),
/// [`reduce_scatter`](Collective::reduce_scatter)) split a buffer of `len` elements into
/// contiguous shards given by [`shard_range`]: lengths need not divide by the world size, and
/// empty shards are allowed.
pub trait Collective: Send + Sync {
    /// This handle's rank.
    fn rank(&self) -> Rank;

    /// The number of ranks in the group.
    fn world_size(&self) -> WorldSize;

    /// Combines `buf` over all ranks with `op`; every rank gets the result in `buf`.
    /// All ranks pass buffers of the same length; every rank gets bit-identical results.
    ///
    /// # Errors
    /// On timeout, a failed peer, or ranks passing different lengths.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Copies `root`'s `buf` into every other rank's `buf` (all of the same length).
    ///
    /// # Errors
    /// On timeout, a failed peer, or ranks passing different lengths or roots.
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()>;

    /// Every rank contributes `shard`, its part [`shard_range`]`(out.len(), world, rank)` of
    /// the result, and receives the whole concatenation in `out`.
    ///
    /// # Errors
    /// On timeout, a failed peer, or a `shard` whose length is not its part of `out`.
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()>;

    /// Combines `buf` over all ranks with `op`, and gives each rank only its part
    /// [`shard_range`]`(buf.len(), world, rank)` of the result, in `shard`.
    ///
    /// # Errors
    /// On timeout, a failed peer, or a `shard` whose length is not its part of `buf`.
    fn reduce_scatter(&self, buf: &[f32], shard: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// On timeout or a failed peer.
    fn barrier(&self) -> Result<()>;

    /// A new group of the same ranks whose collectives are independent of this one's (as
    /// `MPI_Comm_dup`), e.g. one per pipeline stage when the stages of a rank run at the same
    /// time on threads of their own. Every rank calls it together; each gets its handle.
    ///
    /// # Errors
    /// On timeout or a failed peer; [`MultiError::Config`] from an engine that cannot (the
    /// default).
    fn duplicate(&self) -> Result<std::sync::Arc<dyn Collective>> {
        Err(MultiError::Config {
            field: "collective",
            reason: "this engine cannot make a group of its ranks yet (in-process groups can)"
                .into(),
        })
    }

    /// The group of the ranks that pass the same `color`, ordered by `key` (as
    /// `MPI_Comm_split`), e.g. a device mesh's data- and tensor-parallel groups over the
    /// processes of a launched job. Every rank calls it together.
    ///
    /// # Errors
    /// On timeout or a failed peer; [`MultiError::Config`] from an engine that cannot (the
    /// default; in-process meshes are built whole by [`run_mesh`](crate::run_mesh)).
    fn split(&self, color: usize, key: usize) -> Result<std::sync::Arc<dyn Collective>> {
        let _ = (color, key);
        Err(MultiError::Config {
            field: "collective",
            reason: "this engine cannot split its group (MPI's can)".into(),
        })
    }

    /// The NCCL engine behind this handle, where it is one: its calls on GPU memory
    /// ([`NcclCollective::all_reduce_device`](super::nccl::NcclCollective::all_reduce_device)).
    #[cfg(feature = "cuda")]
    fn nccl(&self) -> Option<&super::nccl::NcclCollective> {
        None
    }
}

impl std::fmt::Debug for dyn Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collective")
            .field("rank", &self.rank().index())
            .field("world_size", &self.world_size().get())
            .finish()
    }
}

/// The part of `0..len` owned by `rank` when `len` elements are split over `world` ranks:
/// contiguous, in rank order, the first `len % world` ranks taking one element more.
pub fn shard_range(len: usize, world: WorldSize, rank: Rank) -> Range<usize> {
    let (n, r) = (world.get(), rank.index());
    let (base, extra) = (len / n, len % n);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// Sums `values` over the group in place. The collectives move `f32`, so each `f64` travels
/// as two: its `f32` rounding and the remainder, which keeps about 48 bits of the sum (exact
/// counts past 2^24, norms of many squares). A world of one leaves `values` as they are.
///
/// # Errors
/// As [`Collective::all_reduce`].
pub fn all_reduce_sum_f64(collective: &dyn Collective, values: &mut [f64]) -> Result<()> {
    if collective.world_size().get() == 1 {
        return Ok(());
    }
    let mut parts: Vec<f32> = values
        .iter()
        .flat_map(|&v| {
            let high = v as f32;
            [high, (v - f64::from(high)) as f32]
        })
        .collect();
    collective.all_reduce(&mut parts, ReduceOp::Sum)?;
    for (value, part) in values.iter_mut().zip(parts.chunks_exact(2)) {
        *value = f64::from(part[0]) + f64::from(part[1]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_sums_keep_what_one_f32_would_round_away() {
        let world = WorldSize::new(2).unwrap();
        let sums = crate::collective::run_in_process(world, CollectiveConfig::default(), |c| {
            // 1e8 + 1 and 3 are exact in f64; 1e8 + 1 is not an f32.
            let mut values = [1e8 + 1.0 + 2.0 * c.rank().index() as f64, 0.25];
            all_reduce_sum_f64(c.as_ref(), &mut values)?;
            Ok::<_, crate::MultiError>(values)
        })
        .unwrap();
        for values in sums {
            assert_eq!(values, [2e8 + 4.0, 0.5]);
        }
    }

    #[test]
    fn shards_partition_the_range_in_order() {
        for len in [0, 1, 2, 5, 7, 64] {
            for n in 1..=4 {
                let world = WorldSize::new(n).unwrap();
                let mut next = 0;
                for r in 0..n {
                    let range = shard_range(len, world, Rank::new(r, world).unwrap());
                    assert_eq!(range.start, next);
                    assert!(range.len() == len / n || range.len() == len / n + 1);
                    next = range.end;
                }
                assert_eq!(next, len);
            }
        }
        let world = WorldSize::new(3).unwrap();
        let ranges: Vec<_> = (0..3)
            .map(|r| shard_range(7, world, Rank::new(r, world).unwrap()))
            .collect();
        assert_eq!(ranges, vec![0..3, 3..5, 5..7]);
    }
}
