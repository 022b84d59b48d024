//! Ranks and world sizes, validated when built.

use std::num::NonZeroUsize;

use crate::error::{MultiError, Result};

/// The number of ranks taking part in a run; never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorldSize(NonZeroUsize);

impl WorldSize {
    /// A world of one rank: single-device training.
    pub const ONE: WorldSize = WorldSize(NonZeroUsize::MIN);

    /// A world of `n` ranks.
    ///
    /// # Errors
    /// [`MultiError::EmptyWorld`] when `n` is zero.
    pub fn new(n: usize) -> Result<Self> {
        NonZeroUsize::new(n).map(Self).ok_or(MultiError::EmptyWorld)
    }

    /// The number of ranks.
    pub fn get(self) -> usize {
        self.0.get()
    }
}

/// One rank of a world: an index in `0..world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rank(usize);

impl Rank {
    /// Rank 0, which exists in every world.
    pub const ZERO: Rank = Rank(0);

    /// Rank `index` of `world`.
    ///
    /// # Errors
    /// [`MultiError::RankOutOfRange`] when `index >= world.get()`.
    pub fn new(index: usize, world: WorldSize) -> Result<Self> {
        if index < world.get() {
            Ok(Self(index))
        } else {
            Err(MultiError::RankOutOfRange {
                rank: index,
                world_size: world.get(),
            })
        }
    }

    /// The rank's index.
    pub fn index(self) -> usize {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_world_and_out_of_range_rank_are_errors() {
        assert_eq!(WorldSize::new(0), Err(MultiError::EmptyWorld));
        let world = WorldSize::new(2).unwrap();
        assert_eq!(Rank::new(1, world).map(Rank::index), Ok(1));
        assert_eq!(
            Rank::new(2, world),
            Err(MultiError::RankOutOfRange {
                rank: 2,
                world_size: 2
            })
        );
    }
}
