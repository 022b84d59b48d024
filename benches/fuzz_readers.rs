//! The reader fuzzer (`kiln::fuzz`): every reader, or those named, with N mutated inputs each
//! from a seed; prints a table and one JSON object, exits non-zero on any finding (a panic,
//! kept under --findings). Replay a run with its --seed.
//!
//!   cargo bench --bench fuzz_readers -- --iterations 1000000          # the long run
//!   cargo bench --bench fuzz_readers -- --iterations 2000 --seed 7    # CI's short pass
//!   cargo bench --bench fuzz_readers -- --target checkpoint --target npy

use std::path::PathBuf;
use std::process::ExitCode;

use kiln::fuzz::{TrackingAllocator, fuzz, targets};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

struct Args {
    iterations: u64,
    seed: u64,
    only: Vec<String>,
    findings: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        iterations: 10_000,
        seed: 1,
        only: Vec::new(),
        findings: PathBuf::from("target/fuzz-findings"),
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = || words.next().ok_or(format!("{word} needs a value"));
        match word.as_str() {
            "--iterations" => args.iterations = value()?.parse().map_err(|e| format!("{e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("{e}"))?,
            "--target" => args.only.push(value()?),
            "--findings" => args.findings = PathBuf::from(value()?),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Panics are findings, counted and kept; their messages go in the table, not to stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let scratch = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
    let mut outcomes = Vec::new();
    println!(
        "{:<12} {:>10} {:>9} {:>7} {:>10} {:>14} {:>10}",
        "reader", "inputs", "accepted", "panics", "slowest", "largest alloc", "x input"
    );
    for target in targets() {
        if !args.only.is_empty() && !args.only.iter().any(|n| n == target.name) {
            continue;
        }
        let dir = scratch.join(target.name);
        let outcome = match fuzz(&target, args.iterations, args.seed, (&dir, &args.findings)) {
            Ok(outcome) => outcome,
            Err(e) => {
                eprintln!("error: {}: {e}", target.name);
                return ExitCode::FAILURE;
            }
        };
        println!(
            "{:<12} {:>10} {:>9} {:>7} {:>8.1}ms {:>14} {:>10.1}",
            outcome.target,
            outcome.inputs,
            outcome.accepted,
            outcome.panics.len(),
            outcome.slowest.as_secs_f64() * 1e3,
            outcome.largest_allocation,
            outcome.largest_allocation_ratio
        );
        for (file, message) in &outcome.panics {
            println!("  panic on {}: {message}", file.display());
        }
        outcomes.push(outcome);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let found = outcomes.iter().map(|o| o.panics.len()).sum::<usize>();
    let summary = serde_json::json!({
        "bench": "fuzz_readers",
        "iterations_per_reader": args.iterations,
        "seed": args.seed,
        "cpu": kiln::kernels::isa::cpu_model(),
        "findings": found,
        "readers": outcomes,
    });
    println!("{summary}");
    if found > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
