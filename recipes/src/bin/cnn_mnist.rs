//! `cnn-mnist`: trains SimpleCNN on MNIST; the same as `kiln train cnn-mnist`.

use clap::Parser;
use kiln_recipes::cli::CnnMnistArgs;
use kiln_trainer::report::Verbosity;

/// Train SimpleCNN on MNIST (SGD lr 0.01, momentum 0.9, batch 64, 5 epochs).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: CnnMnistArgs,
    /// Print the results as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = kiln_recipes::cnn_mnist::run(&cli.args.to_config(Verbosity::Bar)?)?;
    if cli.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}
