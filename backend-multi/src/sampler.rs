//! [`DistributedSampler`]: which sample indices each rank sees in each epoch.
//!
//! Semantics follow PyTorch's `torch.utils.data.DistributedSampler`: a permutation drawn from
//! `(seed, epoch)`, padded by repeating its head (or trimmed, with `drop_last`) to a multiple of
//! the world size, then rank `r` takes every `world_size`-th index starting at `r`. Every rank
//! therefore gets the same number of samples, and so the same number of batches.
//!
//! Unlike PyTorch, the epoch is an argument of [`DistributedSampler::indices`], not hidden
//! state set by `set_epoch`: a caller cannot forget to reshuffle.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// Options of a [`DistributedSampler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistributedSamplerConfig {
    /// Reshuffle every epoch (training) or keep the data set order (evaluation).
    pub shuffle: bool,
    /// Seed of the permutation; every rank must use the same one.
    pub seed: u64,
    /// Drop the tail that does not divide evenly instead of padding with repeated samples.
    pub drop_last: bool,
}

/// Splits `len` sample indices over the ranks of a world, epoch by epoch.
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    len: usize,
    world: WorldSize,
    config: DistributedSamplerConfig,
    per_rank: usize,
}

impl DistributedSampler {
    /// A sampler over a data set of `len` samples.
    ///
    /// # Errors
    /// [`MultiError::TooFewSamples`] when some rank would get no sample at all.
    pub fn new(len: usize, world: WorldSize, config: DistributedSamplerConfig) -> Result<Self> {
        let per_rank = if config.drop_last {
            len / world.get()
        } else {
            len.div_ceil(world.get())
        };
        if per_rank == 0 {
            return Err(MultiError::TooFewSamples {
                len,
                world_size: world.get(),
                drop_last: config.drop_last,
            });
        }
        Ok(Self {
            len,
            world,
            config,
            per_rank,
        })
    }

    /// Number of samples every rank gets per epoch.
    pub fn samples_per_rank(&self) -> usize {
        self.per_rank
    }

    /// The indices `rank` visits in `epoch`, in order.
    pub fn indices(&self, rank: Rank, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.config.shuffle {
            // Mix the epoch in so that consecutive epochs and seeds give unrelated streams.
            let stream = self
                .config
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(epoch);
            order.shuffle(&mut StdRng::seed_from_u64(stream));
        }
        let total = self.per_rank * self.world.get();
        if total > order.len() {
            let padding: Vec<usize> = order
                .iter()
                .copied()
                .cycle()
                .take(total - order.len())
                .collect();
            order.extend(padding);
        } else {
            order.truncate(total);
        }
        order
            .into_iter()
            .skip(rank.index())
            .step_by(self.world.get())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(len: usize, world: usize, shuffle: bool, drop_last: bool) -> DistributedSampler {
        let config = DistributedSamplerConfig {
            shuffle,
            seed: 11,
            drop_last,
        };
        DistributedSampler::new(len, WorldSize::new(world).unwrap(), config).unwrap()
    }

    fn rank(i: usize, world: usize) -> Rank {
        Rank::new(i, WorldSize::new(world).unwrap()).unwrap()
    }

    #[test]
    fn unshuffled_split_matches_pytorch() {
        // torch DistributedSampler(range(10), num_replicas=3, rank=r, shuffle=False):
        // r0 [0, 3, 6, 9], r1 [1, 4, 7, 0], r2 [2, 5, 8, 1].
        let s = sampler(10, 3, false, false);
        assert_eq!(s.indices(rank(0, 3), 0), vec![0, 3, 6, 9]);
        assert_eq!(s.indices(rank(1, 3), 0), vec![1, 4, 7, 0]);
        assert_eq!(s.indices(rank(2, 3), 0), vec![2, 5, 8, 1]);
        let dropped = sampler(10, 3, false, true);
        assert_eq!(dropped.indices(rank(2, 3), 0), vec![2, 5, 8]);
    }

    #[test]
    fn shuffled_epoch_is_a_permutation_that_changes_with_epoch() {
        let s = sampler(100, 1, true, false);
        let e0 = s.indices(Rank::ZERO, 0);
        let e1 = s.indices(Rank::ZERO, 1);
        assert_ne!(e0, e1);
        assert_eq!(e0, s.indices(Rank::ZERO, 0));
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_cover_the_permutation_without_overlap() {
        let s = sampler(9, 2, true, false);
        let a = s.indices(rank(0, 2), 4);
        let b = s.indices(rank(1, 2), 4);
        assert_eq!(a.len(), 5);
        assert_eq!(b.len(), 5);
        let mut all: Vec<usize> = a.into_iter().chain(b).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 9);
    }

    #[test]
    fn too_small_data_set_is_an_error() {
        let err = DistributedSampler::new(
            1,
            WorldSize::new(2).unwrap(),
            DistributedSamplerConfig {
                shuffle: false,
                seed: 0,
                drop_last: true,
            },
        )
        .unwrap_err();
        assert!(matches!(err, MultiError::TooFewSamples { len: 1, .. }));
    }
}
