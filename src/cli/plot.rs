//! `kiln plot`: the curves of one or more runs on one chart.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_recipes::plot::plot_runs;

/// Flags of `kiln plot`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kiln plot runs/cnn-mnist --out curves.png
  kiln plot runs/one-rank runs/two-ranks --metric loss/validation --metric accuracy/validation --out compare.png
Metrics are the runs' TensorBoard tags: loss/train_step, loss/train, loss/validation,
accuracy/validation, optimizer/lr, optimizer/grad_norm, speed/samples_per_sec, ...")]
pub struct PlotArgs {
    /// Run directories; each is one line, named after its directory.
    #[arg(value_name = "RUN", required = true)]
    runs: Vec<PathBuf>,
    /// A metric to draw, one panel each (repeat for more) [default: loss/train_step,
    /// loss/validation and accuracy/validation, those the runs have].
    #[arg(long, value_name = "NAME")]
    metric: Vec<String>,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    out: PathBuf,
}

/// Draws the chart and says where it is.
pub fn run(args: &PlotArgs, json: bool) -> anyhow::Result<()> {
    let plotted = plot_runs(&args.runs, &args.metric, &args.out).context("kiln plot failed")?;
    if json {
        let points: serde_json::Map<String, serde_json::Value> = plotted
            .points
            .iter()
            .map(|(run, n)| (run.clone(), (*n).into()))
            .collect();
        let line = serde_json::json!({
            "out": plotted.out,
            "metrics": plotted.metrics,
            "points": points,
        });
        println!("{line}");
    } else {
        println!(
            "{} ({} of {} run{})",
            plotted.out.display(),
            plotted.metrics.join(", "),
            plotted.points.len(),
            if plotted.points.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
