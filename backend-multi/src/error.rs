/// Errors of the multi-device layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultiError {
    /// A world of zero ranks was asked for.
    #[error("world size must be at least 1")]
    EmptyWorld,
    /// A rank outside `0..world_size`.
    #[error("rank {rank} is out of range for a world of {world_size} ranks")]
    RankOutOfRange {
        /// The rank that was given.
        rank: usize,
        /// The size of the world.
        world_size: usize,
    },
    /// A sampler over an empty data set, or one too small to give every rank a sample.
    #[error("cannot split {len} samples over {world_size} ranks with drop_last = {drop_last}")]
    TooFewSamples {
        /// Samples in the data set.
        len: usize,
        /// Ranks to split them over.
        world_size: usize,
        /// Whether the tail that does not divide evenly is dropped.
        drop_last: bool,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, MultiError>;
