use std::time::Duration;

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
    /// Some peers did not reach a collective within the timeout.
    #[error(
        "rank {rank}: {op} timed out after {timeout:?} waiting for rank(s) {missing:?} \
         (a peer is stalled, dead, or calling a different collective)"
    )]
    Timeout {
        /// The rank reporting the error.
        rank: usize,
        /// The collective that was waiting.
        op: &'static str,
        /// The configured timeout.
        timeout: Duration,
        /// Ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// A peer left the group (it failed, panicked or dropped its handle) or the group already
    /// failed, so this collective can never complete.
    #[error("rank {rank}: {op} cannot complete: {reason}")]
    PeerFailed {
        /// The rank reporting the error.
        rank: usize,
        /// The collective that was called.
        op: &'static str,
        /// What happened to the group, naming the peer.
        reason: String,
    },
    /// Ranks called different collectives, or the same one with incompatible buffers.
    #[error("rank {rank}: {op}: ranks disagree: {detail}")]
    Mismatch {
        /// The rank reporting the error.
        rank: usize,
        /// The collective that was called.
        op: &'static str,
        /// What differs between the ranks.
        detail: String,
    },
    /// A buffer has the wrong length for the call.
    #[error("rank {rank}: {op}: buffer has {got} elements, expected {expected}")]
    BufferLength {
        /// The rank reporting the error.
        rank: usize,
        /// The collective that was called.
        op: &'static str,
        /// The length the call needs.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A rank's thread panicked.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank that panicked.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// A tensor could not be read back or rebuilt while synchronising parameters or gradients.
    #[error("{context}: {detail}")]
    Tensor {
        /// What was being done, naming the parameter.
        context: String,
        /// The underlying error.
        detail: String,
    },
    /// A parameter of a pipeline stage is not on the stage's device.
    #[error(
        "stage {stage} ('{stage_name}'): layer {layer} is on {found} but the stage is placed on {expected}"
    )]
    Placement {
        /// The stage index.
        stage: usize,
        /// The stage's name.
        stage_name: String,
        /// Path of the misplaced parameter in the stage's module.
        layer: String,
        /// Where the parameter is.
        found: String,
        /// Where the stage runs.
        expected: String,
    },
    /// A pipeline stage cannot run: wrong activation rank, a neighbour failed or timed out.
    #[error("pipeline stage {stage}: {reason}")]
    Pipeline {
        /// The stage reporting the error.
        stage: usize,
        /// What went wrong.
        reason: String,
    },
    /// A device was asked for that this build or this machine does not have.
    #[error("device {device}: {reason}")]
    Device {
        /// The device as the user named it (`cuda:1`).
        device: String,
        /// Why it cannot be used, and what to do.
        reason: String,
    },
    /// The NCCL engine failed: a CUDA or NCCL call returned an error.
    #[error("rank {rank}: {op}: {detail}")]
    Nccl {
        /// The rank reporting the error.
        rank: usize,
        /// The collective or setup step.
        op: &'static str,
        /// The CUDA or NCCL error.
        detail: String,
    },
    /// A configuration value is out of range.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The field, as the user names it.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, MultiError>;
