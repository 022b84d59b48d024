//! `kiln collectives`: checks every collective of the engine this process runs on against
//! closed-form values, and optionally measures all-reduce bandwidth. Run alone it uses the
//! in-process engine with --ranks threads; under `kiln launch` it uses MPI, one rank per
//! process. With `--device cuda:N` the data goes over NCCL between GPUs (threads: GPUs N to
//! N + ranks - 1; launched: GPU N + local rank), set up through the same groups.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiln_multi::collective::verify_collective;
use kiln_multi::{
    Collective, CollectiveConfig, DeviceSpec, MultiError, Rank, ReduceOp, Transport, WorldSize,
};
use kiln_recipes::distributed::{on_gpu, run_as_launched};
use serde_json::json;

const MIB: usize = 1024 * 1024;

/// Flags of `kiln collectives`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln collectives --ranks 4                       # in-process engine, 4 threads
  kiln collectives --ranks 2 --device cuda:0       # NCCL between cuda:0 and cuda:1
  kiln launch --nproc-per-node 2 -- kiln collectives --bench --sizes-mib 1,16,64")]
pub struct CollectivesArgs {
    /// Ranks (threads) of the in-process engine when not started by a launcher.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    ranks: u32,
    /// Also measure all-reduce (sum, in place) bandwidth.
    #[arg(long)]
    bench: bool,
    /// Buffer sizes of the bandwidth measurement, in MiB.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_values_t = [1, 16, 64])]
    sizes_mib: Vec<usize>,
    /// cpu (host memory), or cuda:N: NCCL between GPUs from N (a build with --features cuda).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Timed repetitions per size (after one warm-up); the median is reported.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Seconds each collective may wait for the others.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// What one rank found; rank 0's is printed.
struct Outcome {
    engine: &'static str,
    world: usize,
    calls: usize,
    elements: usize,
    /// On NCCL: the all-reduce in a Burn tensor's GPU memory, checked (calls, elements).
    device_memory: Option<(usize, usize)>,
    bandwidth: Vec<serde_json::Value>,
}

/// Runs the check (and the benchmark) on every rank; rank 0 prints the result.
pub fn run(args: &CollectivesArgs, json_output: bool) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let outcome = run_as_launched(timeout, |group| -> anyhow::Result<Option<Outcome>> {
        match group {
            Some(group) => {
                if args.ranks != 2 && args.ranks != 1 {
                    bail!(
                        "--ranks is for the in-process engine; under a launcher every process is one rank"
                    );
                }
                let (engine, group) = if args.device.is_cuda() {
                    ("nccl over mpi", on_gpu(group, args.device, timeout)?.1)
                } else {
                    ("mpi", group)
                };
                let outcome = on_rank(&group, engine, args)?;
                Ok((group.rank() == Rank::ZERO).then_some(outcome))
            }
            None => {
                let world = WorldSize::new(args.ranks as usize)?;
                let config = CollectiveConfig { timeout };
                let transport = args.device.transport(world.get())?;
                let engine = match transport {
                    Transport::Nccl { .. } => "nccl",
                    Transport::SharedMemory => "in-process",
                };
                let outcomes =
                    kiln_multi::run_group(world, config, &transport, |c: Arc<dyn Collective>| {
                        on_rank(&c, engine, args).map_err(|e| MultiError::Config {
                            field: "collectives",
                            reason: format!("{e:#}"),
                        })
                    })?;
                Ok(outcomes.into_iter().next())
            }
        }
    })?;
    let Some(outcome) = outcome else {
        return Ok(());
    };
    if json_output {
        println!(
            "{}",
            json!({
                "engine": outcome.engine,
                "world_size": outcome.world,
                "verified_calls": outcome.calls,
                "verified_elements": outcome.elements,
                "device_memory_all_reduce": outcome.device_memory.map(|(calls, elements)| {
                    json!({"verified_calls": calls, "verified_elements": elements})
                }),
                "all_reduce": outcome.bandwidth,
            })
        );
    } else {
        println!(
            "{} engine, {} ranks: {} collective calls ({} elements) match closed-form values",
            outcome.engine, outcome.world, outcome.calls, outcome.elements
        );
        if let Some((calls, elements)) = outcome.device_memory {
            println!(
                "all_reduce in GPU memory (Burn tensors, as data parallelism's \
                 KILN_DEVICE_ALL_REDUCE=nccl): {calls} calls ({elements} elements) match"
            );
        }
        for row in &outcome.bandwidth {
            println!(
                "all_reduce {:>4} MiB: median {:>8.3} ms, {:>6.2} GB/s",
                row["mib"],
                row["median_ms"].as_f64().unwrap_or(f64::NAN),
                row["gb_per_sec"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

fn on_rank(
    c: &Arc<dyn Collective>,
    engine: &'static str,
    args: &CollectivesArgs,
) -> anyhow::Result<Outcome> {
    let report = verify_collective(c.as_ref()).context("collective self-test failed")?;
    let device_memory = verify_in_device_memory(c)?;
    let mut bandwidth = Vec::new();
    if args.bench {
        for &mib in &args.sizes_mib {
            let mut buf = vec![c.rank().index() as f32 + 1.0; mib * MIB / 4];
            let mut times = Vec::new();
            for rep in 0..=args.reps {
                c.barrier()?;
                let start = Instant::now();
                c.all_reduce(&mut buf, ReduceOp::Sum)?;
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            bandwidth.push(json!({
                "mib": mib,
                "median_ms": median * 1e3,
                "gb_per_sec": (mib * MIB) as f64 / median / 1e9,
            }));
        }
    }
    Ok(Outcome {
        engine,
        world: c.world_size().get(),
        calls: report.calls,
        elements: report.elements,
        device_memory,
        bandwidth,
    })
}

/// On NCCL, the all-reduce data parallelism runs in a gradient bucket's GPU memory
/// (`KILN_DEVICE_ALL_REDUCE=nccl`), on a Burn tensor on this rank's GPU; `None` elsewhere.
#[cfg(feature = "cuda")]
fn verify_in_device_memory(c: &Arc<dyn Collective>) -> anyhow::Result<Option<(usize, usize)>> {
    let Some(nccl) = c.nccl() else {
        return Ok(None);
    };
    let device = DeviceSpec::Cuda(nccl.ordinal()).device()?;
    let report = kiln_multi::data_parallel::verify_device_all_reduce(c, &device)
        .context("all-reduce in GPU memory failed its self-test")?;
    Ok(Some((report.calls, report.elements)))
}

#[cfg(not(feature = "cuda"))]
fn verify_in_device_memory(_: &Arc<dyn Collective>) -> anyhow::Result<Option<(usize, usize)>> {
    Ok(None)
}
