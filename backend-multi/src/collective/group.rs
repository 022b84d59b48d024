//! Starting a group of ranks inside one process, over shared memory or over NCCL.

use std::sync::{Arc, Mutex};

use super::base::{Collective, CollectiveConfig};
use super::in_process::{InProcessCollective, run_in_process};
use crate::error::MultiError;
use crate::mesh::{MeshShape, WorldSize};

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

/// One rank's handles on the groups of a [`MeshShape`], each a collective of its own.
#[derive(Clone)]
pub struct MeshRank {
    /// Every rank of the mesh: what all must agree on (a stop request, the last barrier).
    pub world: Arc<dyn Collective>,
    /// The ranks holding this rank's shard in every replica: they average gradients. Its
    /// rank is this rank's replica.
    pub data: Arc<dyn Collective>,
    /// The ranks splitting this rank's replica: they exchange activations. Its rank is this
    /// rank's shard.
    pub tensor: Arc<dyn Collective>,
}

/// Runs `f` once per rank of a `mesh` of in-process ranks (threads over shared memory), each
/// with its handles on the whole world, its data-parallel group and its tensor-parallel group;
/// results in world-rank order (`replica * tensor + shard`, [`MeshShape::coordinates`]).
///
/// A rank that fails drops its handles once `f` returns, so the peers of each of its groups
/// fail at once instead of waiting for the timeout.
///
/// # Errors
/// The error of the rank whose `f` failed first (the others' are its echoes), or a panic.
pub fn run_mesh<T, E, F>(
    mesh: MeshShape,
    config: CollectiveConfig,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    F: Fn(&MeshRank) -> std::result::Result<T, E> + Sync,
    T: Send,
    E: Send + From<MultiError>,
{
    let groups = |count: usize, size: WorldSize| -> Vec<Vec<Mutex<Option<InProcessCollective>>>> {
        (0..count)
            .map(|_| {
                InProcessCollective::group(size, config)
                    .into_iter()
                    .map(|handle| Mutex::new(Some(handle)))
                    .collect()
            })
            .collect()
    };
    // One tensor-parallel group per replica, one data-parallel group per shard.
    let tensor = groups(mesh.data.get(), mesh.tensor);
    let data = groups(mesh.tensor.get(), mesh.data);
    let take = |slot: &Mutex<Option<InProcessCollective>>| -> Arc<dyn Collective> {
        let handle = slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("each mesh rank takes its own handles once");
        Arc::new(handle)
    };
    // Each rank's outcome with the moment `f` returned, taken before its handles drop (which
    // is what makes its peers fail): the earliest failure is the cause.
    let outcomes = run_in_process(mesh.world(), config, |world: Arc<dyn Collective>| {
        let (replica, shard) = mesh.coordinates(world.rank());
        let groups = MeshRank {
            data: take(&data[shard][replica]),
            tensor: take(&tensor[replica][shard]),
            world,
        };
        let outcome = f(&groups);
        let at = std::time::Instant::now();
        drop(groups);
        Ok::<_, E>((at, outcome))
    })?;
    let first_failure = outcomes
        .iter()
        .enumerate()
        .filter(|(_, (_, outcome))| outcome.is_err())
        .min_by_key(|(_, (at, _))| *at)
        .map(|(rank, _)| rank);
    let mut results = Vec::with_capacity(outcomes.len());
    for (rank, (_, outcome)) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(value) => results.push(value),
            Err(e) if Some(rank) == first_failure => return Err(e),
            Err(_) => {}
        }
    }
    Ok(results)
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::collective::ReduceOp;
    use crate::mesh::Rank;

    fn mesh(data: usize, tensor: usize) -> MeshShape {
        MeshShape {
            data: WorldSize::new(data).unwrap(),
            tensor: WorldSize::new(tensor).unwrap(),
        }
    }

    #[test]
    fn mesh_groups_reduce_over_their_own_ranks() {
        let config = CollectiveConfig {
            timeout: Duration::from_secs(30),
        };
        let sums = run_mesh(mesh(2, 3), config, |rank: &MeshRank| {
            let me = rank.world.rank().index() as f32;
            let (mut data, mut tensor, mut world) = ([me], [me], [me]);
            rank.data.all_reduce(&mut data, ReduceOp::Sum)?;
            rank.tensor.all_reduce(&mut tensor, ReduceOp::Sum)?;
            rank.world.all_reduce(&mut world, ReduceOp::Sum)?;
            let places = (rank.data.rank().index(), rank.tensor.rank().index());
            Ok::<_, MultiError>((places, data[0], tensor[0], world[0]))
        })
        .unwrap();
        // Ranks 0..6 as (replica, shard): replica r holds 3r..3r+3, shard s holds s and s + 3.
        for (r, (places, data, tensor, world)) in sums.into_iter().enumerate() {
            let (replica, shard) = (r / 3, r % 3);
            assert_eq!(places, (replica, shard));
            assert_eq!(data, (shard + shard + 3) as f32, "rank {r}");
            assert_eq!(tensor, (9 * replica + 3) as f32, "rank {r}");
            assert_eq!(world, 15.0);
        }
    }

    #[test]
    fn a_failing_mesh_rank_fails_its_groups_at_once() {
        let config = CollectiveConfig {
            timeout: Duration::from_secs(60),
        };
        let started = Instant::now();
        let outcome = run_mesh(mesh(2, 2), config, |rank: &MeshRank| {
            if rank.world.rank() == Rank::new(3, rank.world.world_size())? {
                return Err(MultiError::Config {
                    field: "test",
                    reason: "rank 3 gives up".into(),
                });
            }
            // Every other rank waits on a group rank 3 is not in, or is: all must end.
            let mut value = [1.0];
            rank.tensor.all_reduce(&mut value, ReduceOp::Sum)?;
            rank.data.all_reduce(&mut value, ReduceOp::Sum)?;
            rank.world.barrier()
        });
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("rank 3 gives up"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the peers waited for the timeout"
        );
    }

    #[test]
    fn duplicated_groups_run_their_collectives_at_the_same_time() {
        let config = CollectiveConfig {
            timeout: Duration::from_secs(30),
        };
        // Each rank duplicates its group twice and runs one all-reduce on each duplicate
        // from two threads at once: independent groups cannot mix them up.
        let sums = run_in_process(WorldSize::new(3).unwrap(), config, |group| {
            let (a, b) = (group.duplicate()?, group.duplicate()?);
            let me = group.rank().index() as f32;
            std::thread::scope(|scope| {
                let first = scope.spawn(|| {
                    let mut x = [me];
                    a.all_reduce(&mut x, ReduceOp::Sum).map(|()| x[0])
                });
                let mut y = [10.0 * me];
                b.all_reduce(&mut y, ReduceOp::Sum)?;
                let x = first.join().expect("the thread does not panic")?;
                Ok::<_, MultiError>((x, y[0], a.rank(), b.world_size()))
            })
        })
        .unwrap();
        for (rank, (x, y, a_rank, b_world)) in sums.into_iter().enumerate() {
            assert_eq!((x, y), (3.0, 30.0));
            assert_eq!((a_rank.index(), b_world.get()), (rank, 3));
        }
    }
}
