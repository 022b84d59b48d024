//! `kiln-multi`: the multi-device layer of kiln.
//!
//! Today it holds the pieces every training run needs, single-device ones included:
//! - [`mesh`]: [`Rank`] and [`WorldSize`], validated once so no function re-checks them;
//! - [`sampler`]: [`DistributedSampler`], PyTorch's `DistributedSampler` semantics with the
//!   epoch passed explicitly, so no rank can forget to reshuffle.
//!
//! Collectives, gradient buckets, sharding and pipelines build on these (see ARCHITECTURE.md).
//! This crate knows nothing of models, recipes or the CLI, and works on indices and buffers,
//! never on a model type.

mod error;
pub mod mesh;
pub mod sampler;

pub use error::{MultiError, Result};
pub use mesh::{Rank, WorldSize};
pub use sampler::{DistributedSampler, DistributedSamplerConfig};
