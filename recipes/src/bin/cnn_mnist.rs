//! `cnn-mnist`: trains SimpleCNN on MNIST; the same as `kiln train cnn-mnist`.

use clap::Parser;
use kiln_multi::Rank;
use kiln_recipes::cli::CnnMnistArgs;
use kiln_recipes::distributed::run_as_launched;
use kiln_recipes::report::Report;
use kiln_trainer::report::Verbosity;

/// Train SimpleCNN on MNIST (SGD lr 0.01, momentum 0.9, batch 64, 5 epochs).
#[derive(Parser)]
#[command(
    version,
    about = "Train SimpleCNN on MNIST (SGD lr 0.01, momentum 0.9, batch 64, 5 epochs); the same as `kiln train cnn-mnist`."
)]
struct Cli {
    #[command(flatten)]
    args: CnnMnistArgs,
    /// Print the results as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Print nothing on stderr but errors (no progress bar, no per-epoch lines).
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Bar
    };
    let mut config = cli.args.to_config(verbosity)?;
    // Under `kiln launch` or mpirun, this process is one rank; rank 0 prints the report.
    run_as_launched(config.collective_timeout, |group| -> anyhow::Result<()> {
        let is_root = group.as_ref().is_none_or(|g| g.rank() == Rank::ZERO);
        config.process_group = group;
        let report = kiln_recipes::cnn_mnist::run(&config)?;
        if is_root {
            println!("{}", report.stdout_line(cli.json)?);
        }
        Ok(())
    })
}
