//! Uneven shards in equal blocks: NCCL's all-gather and reduce-scatter give every rank the same
//! number of elements, while the [`Collective`](super::Collective) trait splits a buffer by
//! [`shard_range`], whose shards differ by one element when the length does not divide. Each
//! shard travels in a block of `len.div_ceil(world)` elements, zero-padded at its end.

use super::base::shard_range;
use crate::mesh::{Rank, WorldSize};

/// Elements per rank's block for a buffer of `len`.
pub(crate) fn block_len(len: usize, world: WorldSize) -> usize {
    len.div_ceil(world.get())
}

/// `buf` laid out as one zero-padded block per rank: block `r` holds shard `r`.
pub(crate) fn to_blocks(buf: &[f32], world: WorldSize) -> Vec<f32> {
    let block = block_len(buf.len(), world);
    let mut blocks = vec![0.0; block * world.get()];
    for (r, chunk) in blocks
        .chunks_mut(block.max(1))
        .enumerate()
        .take(world.get())
    {
        let range = shard_range(buf.len(), world, rank(r, world));
        chunk[..range.len()].copy_from_slice(&buf[range]);
    }
    blocks
}

/// The inverse of [`to_blocks`]: the shards of `blocks` written into `out` (of the buffer's
/// length), padding dropped.
pub(crate) fn from_blocks(blocks: &[f32], world: WorldSize, out: &mut [f32]) {
    let block = block_len(out.len(), world);
    for r in 0..world.get() {
        let range = shard_range(out.len(), world, rank(r, world));
        let start = r * block;
        let len = range.len();
        out[range].copy_from_slice(&blocks[start..start + len]);
    }
}

fn rank(r: usize, world: WorldSize) -> Rank {
    Rank::new(r, world).expect("r < world")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What NCCL does with the blocks, in plain Rust: all-gather concatenates every rank's
    /// block; reduce-scatter sums block `r` over ranks and gives it to rank `r`.
    #[test]
    fn blocks_carry_uneven_shards_through_equal_block_collectives() {
        for n in 1..=4 {
            let world = WorldSize::new(n).unwrap();
            for len in [0, 1, 2, 5, 7, 13] {
                let buffers: Vec<Vec<f32>> = (0..n)
                    .map(|r| (0..len).map(|i| (r * 100 + i) as f32).collect())
                    .collect();
                let block = block_len(len, world);
                // Reduce-scatter: rank r keeps the sum of shard r.
                let blocked: Vec<Vec<f32>> = buffers.iter().map(|b| to_blocks(b, world)).collect();
                let mut gathered = Vec::new();
                for r in 0..n {
                    let range = shard_range(len, world, rank(r, world));
                    let summed: Vec<f32> = (0..block)
                        .map(|j| blocked.iter().map(|b| b[r * block + j]).sum())
                        .collect();
                    let want: Vec<f32> = range
                        .clone()
                        .map(|i| buffers.iter().map(|b| b[i]).sum())
                        .collect();
                    assert_eq!(
                        &summed[..range.len()],
                        &want[..],
                        "n {n} len {len} rank {r}"
                    );
                    assert!(summed[range.len()..].iter().all(|&x| x == 0.0));
                    // All-gather of those shards, each sent as a padded block.
                    gathered.extend_from_slice(&summed);
                }
                let mut out = vec![f32::NAN; len];
                from_blocks(&gathered, world, &mut out);
                let total: Vec<f32> = (0..len)
                    .map(|i| buffers.iter().map(|b| b[i]).sum())
                    .collect();
                assert_eq!(out, total, "n {n} len {len}");
            }
        }
    }
}
