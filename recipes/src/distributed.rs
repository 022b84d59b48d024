//! Running a recipe as one rank of a multi-process job.
//!
//! A process started by `kiln launch` or `mpirun` (or with `torchrun`'s `RANK`/`WORLD_SIZE`)
//! joins the job's MPI world and trains data parallel with it; a process started on its own
//! runs alone. MPI support is the `mpi` cargo feature; a build without it refuses to run as
//! one rank of several rather than silently train alone.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use kiln_multi::launch::LaunchEnv;
use kiln_multi::{Collective, DeviceSpec};

use crate::error::RecipeError;

/// Whether this binary was built with the MPI engine (the `mpi` feature).
pub const MPI_ENABLED: bool = cfg!(feature = "mpi");

/// Set by `kiln launch` for its ranks: the attempt (0 first, one more per restart).
pub const RESTART_ENV: &str = "KILN_RESTART";
/// Set by `kiln launch` for its ranks: the restarts it allows (`--max-restarts`).
pub const MAX_RESTARTS_ENV: &str = "KILN_MAX_RESTARTS";

/// Under `kiln launch --max-restarts`: (this attempt, the restarts allowed); (0, 0) otherwise.
pub fn launch_restarts() -> (u32, u32) {
    let read = |name| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (read(RESTART_ENV), read(MAX_RESTARTS_ENV))
}

/// Runs `job` in this process: with `None` when no launcher started it (or it is the only
/// rank), with this rank's handle on the job's group otherwise.
///
/// Under a launcher, the job ends as the MPI engine ends jobs: finalised on success; on
/// failure, `rank R: error: ...` on stderr and every rank of the job stopped with a non-zero
/// exit (a rank must not leave its peers waiting in a collective).
///
/// # Errors
/// [`RecipeError::Launch`] when the launch cannot be joined: a build without MPI, or
/// `RANK`/`WORLD_SIZE` that MPI's world does not match (a `torchrun` start, which has no MPI
/// world); and `job`'s own error when it runs alone.
pub fn run_as_launched<T, E>(
    timeout: Duration,
    job: impl FnOnce(Option<Arc<dyn Collective>>) -> Result<T, E>,
) -> Result<T, E>
where
    E: Display + From<RecipeError>,
{
    let env = LaunchEnv::detect().map_err(|e| RecipeError::Launch {
        launcher: "this process's",
        reason: e.to_string(),
    })?;
    let Some(env) = env else {
        return job(None);
    };
    #[cfg(feature = "mpi")]
    return join(env, timeout, job);
    #[cfg(not(feature = "mpi"))]
    #[allow(
        clippy::needless_return,
        reason = "the block stands in for the `return join(..)` of MPI builds"
    )]
    {
        let _ = timeout;
        if env.world.get() == 1 {
            return job(None);
        }
        return Err(RecipeError::Launch {
            launcher: env.launcher.name(),
            reason: format!(
                "this process is rank {} of {}, but this kiln was built without MPI support: \
                 rebuild with `cargo build --release --features mpi` (needs Debian's \
                 libopenmpi-dev, openmpi-bin and libclang-dev)",
                env.rank.index(),
                env.world.get()
            ),
        }
        .into());
    };
}

#[cfg(feature = "mpi")]
fn join<T, E>(
    env: LaunchEnv,
    timeout: Duration,
    job: impl FnOnce(Option<Arc<dyn Collective>>) -> Result<T, E>,
) -> Result<T, E>
where
    E: Display + From<RecipeError>,
{
    use kiln_multi::CollectiveConfig;
    use kiln_multi::collective::mpi::MpiSession;
    use kiln_multi::launch::Launcher;

    let launch_error = |reason: String| RecipeError::Launch {
        launcher: env.launcher.name(),
        reason,
    };
    if env.launcher == Launcher::Torchrun && env.world.get() > 1 {
        // torchrun starts processes but no MPI world: initialising MPI here would give each
        // process a world of its own.
        return Err(launch_error(format!(
            "this process is rank {} of {} by RANK/WORLD_SIZE, without an MPI launcher: \
             kiln's multi-process engine is MPI, so start the ranks with \
             `kiln launch --nproc-per-node N -- ...` (or mpirun)",
            env.rank.index(),
            env.world.get()
        ))
        .into());
    }
    let session =
        MpiSession::init(CollectiveConfig { timeout }).map_err(|e| launch_error(e.to_string()))?;
    let group = session.collective();
    if group.world_size() != env.world || group.rank() != env.rank {
        let reason = format!(
            "the environment says rank {} of {}, but MPI's world has rank {} of {}: start \
             every rank with `kiln launch` (or mpirun), which sets up the MPI world",
            env.rank.index(),
            env.world.get(),
            group.rank().index(),
            group.world_size().get()
        );
        // Nothing has been exchanged yet, but peers may be waiting: stop the whole job.
        return session
            .run(|_| Err::<T, _>(launch_error(reason)))
            .map_err(|e| RecipeError::from(kiln_trainer::TrainError::from(e)).into());
    }
    session
        .run(|group| job(Some(group)))
        .map_err(|e| RecipeError::from(kiln_trainer::TrainError::from(e)).into())
}

/// This launched rank's device and group when the run is on CUDA: GPU `first + local rank`
/// (one GPU per process of a host, as torchrun assigns them) and an NCCL group joined over
/// the launcher's MPI `group`, which carries NCCL's id and the per-call agreement.
///
/// # Errors
/// [`RecipeError::Multi`] when the GPU does not exist or NCCL cannot start.
pub fn on_gpu(
    group: Arc<dyn Collective>,
    first: DeviceSpec,
    timeout: Duration,
) -> Result<(DeviceSpec, Arc<dyn Collective>), RecipeError> {
    let local_rank = LaunchEnv::detect()
        .ok()
        .flatten()
        .map_or(0, |env| env.local_rank);
    let device = first.nth(local_rank);
    let ordinals = device.cuda_ordinals(1)?;
    #[cfg(feature = "cuda")]
    {
        let nccl = kiln_multi::collective::nccl::NcclCollective::join(group, ordinals[0], timeout)?;
        Ok((device, Arc::new(nccl)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        // `cuda_ordinals` already failed in a build without CUDA.
        let _ = (group, timeout, ordinals);
        Err(kiln_multi::MultiError::Device {
            device: device.to_string(),
            reason: "this kiln was built without CUDA support".to_string(),
        }
        .into())
    }
}
