//! Starting a group of ranks inside one process, over shared memory or over NCCL.

use std::sync::Arc;

use super::base::{Collective, CollectiveConfig};
use super::in_process::run_in_process;
use crate::error::MultiError;
use crate::mesh::WorldSize;

/// How the ranks of an in-process group exchange data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Transport {
    /// Through host memory shared by the rank threads (the in-process engine).
    #[default]
    SharedMemory,
    /// Over NCCL between CUDA GPUs, rank `r` on GPU `ordinals[r]` (feature `cuda`); the
    /// in-process engine carries the setup and the per-call agreement.
    Nccl {
        /// The CUDA device index of each rank.
        ordinals: Vec<usize>,
    },
}

/// Runs `f` once per rank of a new in-process group whose collectives go over `transport`,
/// each rank on its own thread; results in rank order. Failures behave as in
/// [`run_in_process`].
///
/// # Errors
/// The earliest error (or panic) of any rank; [`MultiError::Device`] for NCCL in a build
/// without the `cuda` feature, or when `ordinals` does not have one GPU per rank.
pub fn run_group<T, E, F>(
    world: WorldSize,
    config: CollectiveConfig,
    transport: &Transport,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    F: Fn(Arc<dyn Collective>) -> std::result::Result<T, E> + Sync,
    T: Send,
    E: Send + From<MultiError>,
{
    match transport {
        Transport::SharedMemory => run_in_process(world, config, f),
        Transport::Nccl { ordinals } => {
            if ordinals.len() != world.get() {
                return Err(MultiError::Config {
                    field: "ranks",
                    reason: format!(
                        "{} ranks need one GPU each, but {} were given",
                        world.get(),
                        ordinals.len()
                    ),
                }
                .into());
            }
            run_in_process(world, config, |control: Arc<dyn Collective>| {
                let ordinal = ordinals[control.rank().index()];
                let nccl = nccl_rank(control, ordinal, config)?;
                f(nccl)
            })
        }
    }
}

#[cfg(feature = "cuda")]
fn nccl_rank(
    control: Arc<dyn Collective>,
    ordinal: usize,
    config: CollectiveConfig,
) -> crate::error::Result<Arc<dyn Collective>> {
    Ok(Arc::new(super::nccl::NcclCollective::join(
        control,
        ordinal,
        config.timeout,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_rank(
    _control: Arc<dyn Collective>,
    ordinal: usize,
    _config: CollectiveConfig,
) -> crate::error::Result<Arc<dyn Collective>> {
    Err(MultiError::Device {
        device: format!("cuda:{ordinal}"),
        reason: "NCCL needs a kiln built with `--features cuda`".to_string(),
    })
}
