//! `cnn-mnist`: trains SimpleCNN on MNIST; the same as `kiln train cnn-mnist`.

use clap::{CommandFactory, FromArgMatches, Parser};
use kiln_multi::Rank;
use kiln_recipes::cli::CnnMnistArgs;
use kiln_recipes::config_file::{ResolvedConfig, expand_args};
use kiln_recipes::distributed::run_as_launched;
use kiln_recipes::report::Report;
use kiln_trainer::report::Verbosity;

/// Train SimpleCNN on MNIST (SGD lr 0.01, momentum 0.9, batch 64, 5 epochs).
#[derive(Parser)]
#[command(
    name = "cnn-mnist",
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
    // `--config FILE`'s keys become flags where the command line gives none.
    let argv = expand_args(&Cli::command(), std::env::args_os().collect())?;
    let matches = Cli::command().get_matches_from(argv);
    let resolved = ResolvedConfig::of(&Cli::command(), &matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Bar
    };
    let mut config = cli.args.to_config(verbosity)?;
    if cli.args.config.print_config {
        let trainer = kiln_recipes::cnn_mnist::resolved_trainer_config(&config)?;
        print!("{}", resolved.with_trainer(&trainer).to_toml(false));
        return Ok(());
    }
    config.run_config = Some(resolved);
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
