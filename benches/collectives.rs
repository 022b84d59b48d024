//! All-reduce bandwidth between 2 ranks on every CPU engine: in-process threads, and MPI
//! processes started by `kiln launch` over shared memory and over TCP loopback, next to
//! PyTorch's gloo (`benches/data_parallel_pytorch.py --all-reduce-only`) measured in the same
//! run. Each engine runs `kiln collectives --bench` (in-place sum, barrier before each timed
//! call, median over --reps calls) once per round, rounds interleaved so that machine noise
//! hits every engine alike; the median over rounds is reported, in GB/s of buffer (bytes / time).
//! Prints one JSON object.
//!
//! Run: `cargo bench --features mpi --bench collectives` (options: `-- --rounds N --reps N`).

mod common;

use std::process::Command;

use common::{arg, median, run_pytorch_with};
use serde_json::{Value, json};

const SIZES_MIB: [u64; 3] = [1, 16, 64];

/// `kiln ARGS` (ending in `collectives --bench --json`): the bandwidth of each size.
fn bandwidth(args: &[&str]) -> anyhow::Result<Vec<f64>> {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    SIZES_MIB
        .iter()
        .map(|&mib| {
            report["all_reduce"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["mib"] == mib))
                .and_then(|r| r["gb_per_sec"].as_f64())
                .ok_or_else(|| anyhow::anyhow!("no {mib} MiB row in {report}"))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 3).max(1);
    let reps = arg("--reps", 20).max(1).to_string();
    let bench = ["collectives", "--bench", "--json", "--reps", &reps];
    let launch = |transport: &'static str| {
        let mut args = vec!["launch", "--no-prefix", "--nproc-per-node", "2"];
        args.extend(["--transport", transport, "--", "kiln"]);
        args
    };
    let engines: Vec<(&str, Vec<&str>)> = vec![
        ("in_process", ["collectives", "--ranks", "2"].to_vec()),
        ("mpi_shm", launch("shm")),
        ("mpi_tcp_loopback", launch("tcp")),
    ];
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); SIZES_MIB.len()]; engines.len()];
    for _ in 0..rounds {
        for (k, (_, prefix)) in engines.iter().enumerate() {
            let mut args = prefix.clone();
            // `collectives` is already the last word of the in-process prefix.
            args.extend(if k == 0 { &bench[1..] } else { &bench[..] });
            for (s, gbps) in bandwidth(&args)?.into_iter().enumerate() {
                samples[k][s].push(gbps);
            }
        }
    }
    let gloo = run_pytorch_with(
        "data_parallel_pytorch.py",
        &["--reps", &(rounds * 5).to_string(), "--all-reduce-only"],
    );
    let gloo_at = |mib: u64| {
        gloo.as_ref()
            .and_then(|g| g["all_reduce"].as_array().cloned())
            .and_then(|rows| rows.into_iter().find(|r| r["mib"] == mib))
            .and_then(|r| r["gb_per_sec"].as_f64())
    };
    let mut table = serde_json::Map::new();
    for ((name, _), per_size) in engines.iter().zip(&samples) {
        let rows: Vec<Value> = SIZES_MIB
            .iter()
            .zip(per_size)
            .map(|(&mib, values)| {
                let gbps = median(values.clone());
                json!({
                    "mib": mib,
                    "gb_per_sec": gbps,
                    "gb_per_sec_rounds": values,
                    "over_gloo": gloo_at(mib).map(|g| gbps / g),
                })
            })
            .collect();
        table.insert((*name).to_string(), Value::Array(rows));
    }
    let report = json!({
        "benchmark": "collectives",
        "machine": common::machine(),
        "ranks": 2,
        "rounds": rounds,
        "reps_per_round": reps,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "all_reduce": table,
        "gloo": gloo,
    });
    println!("{report}");
    Ok(())
}
