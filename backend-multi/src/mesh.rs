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

/// A 2-D device mesh: `data` replicas of a model, each split over `tensor` ranks.
///
/// A rank's place is `rank = replica * tensor + shard`: the ranks of one tensor-parallel group
/// are consecutive (Megatron's order, which keeps the chattiest group on one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeshShape {
    /// Data-parallel replicas: ranks holding the same shard average their gradients.
    pub data: WorldSize,
    /// Tensor-parallel ranks per replica: they split the layers and see the same batches.
    pub tensor: WorldSize,
}

impl MeshShape {
    /// Every rank of the mesh.
    pub fn world(self) -> WorldSize {
        WorldSize(
            self.data
                .0
                .checked_mul(self.tensor.0)
                .expect("a mesh of more than usize::MAX ranks"),
        )
    }

    /// `rank`'s `(replica, shard)`: its index in its tensor-parallel group's data-parallel
    /// group, and in its tensor-parallel group.
    pub fn coordinates(self, rank: Rank) -> (usize, usize) {
        (
            rank.index() / self.tensor.get(),
            rank.index() % self.tensor.get(),
        )
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

    #[test]
    fn mesh_coordinates_keep_tensor_groups_consecutive() {
        let mesh = MeshShape {
            data: WorldSize::new(2).unwrap(),
            tensor: WorldSize::new(3).unwrap(),
        };
        assert_eq!(mesh.world().get(), 6);
        let places: Vec<_> = (0..6)
            .map(|r| mesh.coordinates(Rank::new(r, mesh.world()).unwrap()))
            .collect();
        assert_eq!(places, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
    }
}
