//! `kiln runs`: the runs under a directory as a table (or JSON lines for scripts).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_trainer::report::runs::{Judged, RunSummary, list_runs};

/// Flags of `kiln runs`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln runs                    # the runs under runs/
  kiln runs experiments/ --json | jq 'select(.status == \"finished\")'")]
pub struct RunsArgs {
    /// The directory whose sub-directories are runs.
    #[arg(value_name = "DIR", default_value = "runs")]
    dir: PathBuf,
}

/// Prints the table, or with `json` one object per run per line.
pub fn run(args: &RunsArgs, json: bool) -> anyhow::Result<()> {
    let runs = list_runs(&args.dir)
        .with_context(|| format!("cannot list the runs under {}", args.dir.display()))?;
    if json {
        for run in &runs {
            println!("{}", serde_json::to_string(run)?);
        }
        return Ok(());
    }
    if runs.is_empty() {
        println!("no runs under {}", args.dir.display());
        return Ok(());
    }
    print!("{}", table(&runs));
    Ok(())
}

const HEADER: [&str; 10] = [
    "run",
    "recipe",
    "model",
    "mode",
    "epochs",
    "best",
    "last",
    "samples/s",
    "size",
    "state",
];

/// The runs as an aligned text table.
fn table(runs: &[RunSummary]) -> String {
    let rows: Vec<[String; 10]> = runs.iter().map(row).collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut text = line(&HEADER.map(String::from));
    for row in &rows {
        text.push_str(&line(row));
    }
    text
}

fn row(run: &RunSummary) -> [String; 10] {
    let name = run.path.file_name().map_or_else(
        || run.path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let epochs = match run.planned_epochs {
        Some(planned) => format!("{}/{planned}", run.epochs_done),
        None => run.epochs_done.to_string(),
    };
    let state = run.status.map_or("-".to_string(), |s| s.to_string());
    [
        name,
        or_dash(&run.recipe),
        or_dash(&run.model),
        or_dash(&run.mode),
        epochs,
        run.best.map_or("-".into(), judged),
        run.last.map_or("-".into(), judged),
        run.samples_per_sec
            .map_or("-".into(), |s| format!("{s:.0}")),
        size(run.size_bytes),
        state,
    ]
}

/// `acc 98.10% @5` or `loss 0.1397 @3`.
fn judged(j: Judged) -> String {
    match j.metric {
        "accuracy" => format!("acc {:.2}% @{}", j.value * 100.0, j.epoch),
        _ => format!("{} {:.4} @{}", j.metric, j.value, j.epoch),
    }
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
