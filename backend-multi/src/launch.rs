//! How a process learns that it is one rank of a multi-process job, from the environment its
//! launcher set: `mpirun` (Open MPI), a PMI launcher (Slurm's `srun`, MPICH's Hydra), or
//! `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`).

use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// Which launcher set the variables a [`LaunchEnv`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Open MPI's `mpirun` (`OMPI_COMM_WORLD_RANK`, `..._SIZE`, `..._LOCAL_RANK`).
    OpenMpi,
    /// A PMI launcher (`PMI_RANK`, `PMI_SIZE`, and `MPI_LOCALRANKID` when set).
    Pmi,
    /// `torchrun` or anything setting `RANK`, `WORLD_SIZE` and `LOCAL_RANK`.
    Torchrun,
}

impl Launcher {
    /// The launcher's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::OpenMpi => "mpirun (Open MPI)",
            Launcher::Pmi => "a PMI launcher",
            Launcher::Torchrun => "torchrun-style RANK/WORLD_SIZE",
        }
    }
}

/// This process's place in a multi-process job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank in the job.
    pub rank: Rank,
    /// The number of processes in the job.
    pub world: WorldSize,
    /// This process's index among the ranks of its host: which local device it should use.
    pub local_rank: usize,
    /// Where the values come from.
    pub launcher: Launcher,
}

impl LaunchEnv {
    /// Reads the launch variables of this process; `None` when no launcher set any.
    ///
    /// # Errors
    /// [`MultiError::Config`] when a variable is set but is not a number, or the rank is not
    /// below the world size.
    pub fn detect() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`detect`](Self::detect), reading variables through `var` (for tests).
    ///
    /// # Errors
    /// As [`detect`](Self::detect).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let sources = [
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            (Launcher::Pmi, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            (Launcher::Torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ];
        for (launcher, rank_var, size_var, local_var) in sources {
            let (Some(rank), Some(size)) = (var(rank_var), var(size_var)) else {
                continue;
            };
            let number = |name: &'static str, value: &str| {
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| MultiError::Config {
                        field: name,
                        reason: format!("'{value}' is not a non-negative integer"),
                    })
            };
            let world =
                WorldSize::new(number(size_var, &size)?).map_err(|_| MultiError::Config {
                    field: size_var,
                    reason: "must be at least 1".to_string(),
                })?;
            let rank =
                Rank::new(number(rank_var, &rank)?, world).map_err(|e| MultiError::Config {
                    field: rank_var,
                    reason: e.to_string(),
                })?;
            let local_rank = match var(local_var) {
                Some(value) => number(local_var, &value)?,
                None => 0,
            };
            return Ok(Some(Self {
                rank,
                world,
                local_rank,
                launcher,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn reads_each_launcher_and_prefers_mpi() {
        assert_eq!(LaunchEnv::from_vars(env(&[])).unwrap(), None);
        let torchrun = LaunchEnv::from_vars(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                torchrun.rank.index(),
                torchrun.world.get(),
                torchrun.local_rank
            ),
            (3, 4, 1)
        );
        assert_eq!(torchrun.launcher, Launcher::Torchrun);
        let both = LaunchEnv::from_vars(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (both.rank.index(), both.world.get(), both.local_rank),
            (1, 2, 0)
        );
        assert_eq!(both.launcher, Launcher::OpenMpi);
    }

    #[test]
    fn bad_values_are_errors_naming_the_variable() {
        let err = LaunchEnv::from_vars(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("RANK"), "{err}");
        let err = LaunchEnv::from_vars(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
        let err = LaunchEnv::from_vars(env(&[("PMI_RANK", "0"), ("PMI_SIZE", "0")])).unwrap_err();
        assert!(err.to_string().contains("PMI_SIZE"), "{err}");
    }
}
