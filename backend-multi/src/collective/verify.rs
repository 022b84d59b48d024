//! A self-test of a collective engine: every operation, over lengths that do and do not split
//! evenly over the ranks, compared element by element with values computed in closed form.
//! `kiln collectives` runs it on whatever engine the process was started with.

use super::base::{Collective, ReduceOp, shard_range};
use crate::error::{MultiError, Result};
use crate::mesh::Rank;

/// Lengths the self-test uses: empty, shorter than the world, uneven, and a few MiB.
pub const VERIFY_LENGTHS: [usize; 6] = [0, 1, 7, 1000, 5003, 1 << 20];

/// What [`verify_collective`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// Collective calls made and compared.
    pub calls: usize,
    /// Elements compared in all.
    pub elements: usize,
}

/// Rank `r`'s value at index `i`: small integers, so that every sum is exact in f32.
pub(crate) fn value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 7 + 1)) as f32
}

/// Runs every collective of `c` on every length of [`VERIFY_LENGTHS`] (and every reduction),
/// and compares the results with closed-form values: for `n` ranks where rank `r` holds
/// `(r + 1) * (i % 7 + 1)` at index `i`, the sum is `n (n + 1) / 2 * (i % 7 + 1)`, the mean
/// that over `n`, and the maximum `n * (i % 7 + 1)`. All ranks must call it together.
///
/// # Errors
/// [`MultiError::Mismatch`] naming the operation, length and first wrong element; any error
/// of the engine itself.
pub fn verify_collective(c: &dyn Collective) -> Result<VerifyReport> {
    let (n, rank) = (c.world_size().get(), c.rank().index());
    let mut report = VerifyReport {
        calls: 0,
        elements: 0,
    };
    let mut expect = |op: &'static str, len: usize, got: &[f32], want: &dyn Fn(usize) -> f32| {
        report.calls += 1;
        report.elements += got.len();
        match got.iter().enumerate().find(|&(i, &g)| g != want(i)) {
            None => Ok(()),
            Some((i, &g)) => Err(MultiError::Mismatch {
                rank,
                op,
                detail: format!(
                    "length {len}: element {i} is {g}, the closed-form value is {}",
                    want(i)
                ),
            }),
        }
    };
    let triangle = (n * (n + 1) / 2) as f32;
    let reduced = |op: ReduceOp, i: usize| -> f32 {
        let base = (i % 7 + 1) as f32;
        match op {
            ReduceOp::Sum => triangle * base,
            ReduceOp::Avg => triangle * base / n as f32,
            ReduceOp::Max => n as f32 * base,
        }
    };
    for len in VERIFY_LENGTHS {
        let mine: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let mut buf = mine.clone();
            c.all_reduce(&mut buf, op)?;
            expect("all_reduce", len, &buf, &|i| reduced(op, i))?;

            let range = shard_range(len, c.world_size(), c.rank());
            let mut shard = vec![f32::NAN; range.len()];
            c.reduce_scatter(&mine, &mut shard, op)?;
            expect("reduce_scatter", len, &shard, &|i| {
                reduced(op, range.start + i)
            })?;
        }
        let root = Rank::new(n - 1, c.world_size()).expect("n - 1 < n");
        let mut buf = mine.clone();
        c.broadcast(&mut buf, root)?;
        expect("broadcast", len, &buf, &|i| value(n - 1, i))?;

        // Every rank contributes the indices of its own shard: the result is 0, 1, 2, ...
        let range = shard_range(len, c.world_size(), c.rank());
        let shard: Vec<f32> = range.clone().map(|i| i as f32).collect();
        let mut out = vec![f32::NAN; len];
        c.all_gather(&shard, &mut out)?;
        expect("all_gather", len, &out, &|i| i as f32)?;
    }
    c.barrier()?;
    report.calls += 1;
    Ok(report)
}
