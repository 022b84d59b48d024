//! `Cli` and its subcommands. Each subcommand turns its flags into a recipe configuration,
//! calls the recipe, and prints its report.

mod bench;
mod check_device;
mod collectives;
mod launch;
mod plot;
mod runs;

use std::path::PathBuf;
use std::process::ExitCode;

use std::ffi::OsString;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kiln_multi::Rank;
use kiln_recipes::cli::{
    CnnMnistArgs, FinetuneArgs, GenerateArgs, GptArgs, ModelSourceArgs, QuantizeArgs,
};
use kiln_recipes::config_file::{ResolvedConfig, expand};
use kiln_recipes::distributed::run_as_launched;
use kiln_recipes::report::Report;
use kiln_trainer::report::Verbosity;

/// Kiln: train, evaluate and run models with Burn.
///
/// Examples:
///   kiln train cnn-mnist                     # 5 epochs on the embedded MNIST subset
///   kiln train cnn-mnist --resume --out runs/cnn-mnist --epochs 8
///   kiln train gpt                           # a byte-level GPT on Tiny Shakespeare
///   kiln generate --checkpoint runs/gpt --prompt "ROMEO:"
///   kiln eval --checkpoint runs/cnn-mnist
///   kiln eval --model simple-cnn --weights simple_cnn.pth
///   kiln quantize --checkpoint runs/cnn-mnist              # int8 weights, size/accuracy report
///   kiln train cnn-mnist --qat int4 --qat-granularity block:32   # quantization-aware training
///   kiln predict --model simple-cnn --weights simple_cnn.safetensors --input x.npy --output logits.npy
///   kiln predict --checkpoint runs/finetune --image data/digits/val/7   # top-5 classes per image
///   kiln launch --nproc-per-node 2 -- kiln train cnn-mnist   # 2 processes over MPI (feature mpi)
///   kiln check-device --device cuda:0        # the GPU against the CPU (feature cuda)
///   kiln bench resnet18 --device cuda:0      # ResNet-18 samples/s on this machine
///   kiln runs                                # the runs under runs/, as a table
///   kiln plot runs/a runs/b --out ab.png     # their curves on one chart
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print the results as one JSON object on the last line of stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Print nothing on stderr but errors (no progress bar, no per-epoch lines).
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a recipe; progress on stderr, checkpoints and metrics.jsonl in the output directory.
    #[command(subcommand)]
    Train(TrainRecipe),
    /// Fine-tune a torchvision ResNet on an image folder: the head replaced for its classes,
    /// optionally from PyTorch weights and with the backbone frozen; checkpoints, metrics and
    /// the fine-tuned weights (SafeTensors, torchvision's names) in the run directory.
    ///
    /// Examples:
    ///   kiln finetune --image-size 32 --epochs 3          # the shipped digits demo, from scratch
    ///   kiln finetune --weights resnet18-f37072fd.pth --data my_images --freeze-backbone
    ///   kiln eval --checkpoint runs/finetune
    #[command(verbatim_doc_comment)]
    Finetune(FinetuneArgs),
    /// Evaluate a checkpoint or PyTorch weights: loss and accuracy on the MNIST test split, or
    /// on the val/ folder of a fine-tuned ResNet's data.
    Eval(EvalArgs),
    /// Run a float32 NCHW .npy batch through a model (eval mode, no preprocessing) and write the
    /// logits as .npy.
    Predict(PredictArgs),
    /// Quantize a checkpoint's Linear and Conv2d weights to int8 or int4 (like PyTorch's
    /// quantize_dynamic), write them as SafeTensors and compare the result with the float
    /// model: size, accuracy, argmax agreement, speed. SimpleCNN is compared on the MNIST test
    /// split, a fine-tuned ResNet (kiln finetune) on its validation folder.
    ///
    /// Examples:
    ///   kiln quantize --checkpoint runs/cnn-mnist
    ///   kiln quantize --checkpoint runs/cnn-mnist --scheme int4 --granularity block:32
    ///   kiln eval --checkpoint runs/cnn-mnist/simple-cnn-int8-tensor.safetensors
    ///   kiln quantize --checkpoint runs/finetune --granularity channel
    #[command(verbatim_doc_comment)]
    Quantize(QuantizeArgs),
    /// Continue a text with a model trained by `kiln train gpt`: bytes drawn one at a time
    /// (temperature, top-k, seed) with a key/value cache, streamed to stdout.
    ///
    /// Examples:
    ///   kiln generate --checkpoint runs/gpt --prompt "ROMEO:" --tokens 300
    ///   kiln generate --checkpoint runs/gpt --temperature 0     # greedy
    #[command(verbatim_doc_comment)]
    Generate(GenerateArgs),
    /// Start N ranks of a command with mpirun (one process each), prefix their output with
    /// the rank, and fail when any rank fails.
    Launch(launch::LaunchArgs),
    /// Check every collective (all-reduce, broadcast, all-gather, reduce-scatter, barrier)
    /// against closed-form values, and measure all-reduce bandwidth with --bench.
    Collectives(collectives::CollectivesArgs),
    /// Check a device against a reference with the same weights and inputs: the GPU against
    /// the CPU, or on the CPU kiln's kernels against Burn's ops (logits and every gradient of
    /// SimpleCNN and ResNet-18).
    CheckDevice(check_device::CheckDeviceArgs),
    /// Measure training and inference throughput (samples/s) on a device, optionally next to
    /// PyTorch's twin script in the same run.
    Bench(bench::BenchArgs),
    /// List the runs under a directory (runs/ by default): recipe, model, mode, epochs done
    /// of planned, best and last validation figure, throughput, size on disk, and whether
    /// each finished, failed, was stopped or is still running.
    Runs(runs::RunsArgs),
    /// Draw the curves of one or more runs (their TensorBoard scalars) into a PNG: one panel
    /// per metric, one line per run.
    Plot(plot::PlotArgs),
}

#[derive(Debug, Subcommand)]
enum TrainRecipe {
    /// SimpleCNN on MNIST: SGD lr 0.01, momentum 0.9, batch 64, 5 epochs.
    CnnMnist(CnnMnistArgs),
    /// A byte-level GPT (4 layers, 4 heads, 128 wide, 64 tokens of context) on Tiny
    /// Shakespeare or any text file: AdamW, warm-up + cosine, clipping, 3 epochs (about 4
    /// minutes on 2 cores); sample from it with kiln generate.
    ///
    /// Examples:
    ///   kiln train gpt                                   # a few minutes on 2 cores
    ///   kiln train gpt --data my.txt --layers 6 --embed 192 --heads 6 --epochs 3
    ///   kiln train gpt --ranks 2 --zero 1                # data parallel, sharded AdamW
    ///   kiln train gpt --mesh dp=2,tp=2 --zero 2         # each tensor-parallel part's AdamW sharded over its 2 replicas
    ///   kiln generate --checkpoint runs/gpt --prompt "ROMEO:" --tokens 300
    #[command(verbatim_doc_comment)]
    Gpt(GptArgs),
}

#[derive(Debug, Args)]
struct EvalArgs {
    #[command(flatten)]
    source: ModelSourceArgs,
    /// Directory of MNIST IDX files [default: the embedded subset]; for a fine-tuned ResNet,
    /// the image folder whose val/ is evaluated [default: the one it was trained on].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
}

#[derive(Debug, Args)]
struct PredictArgs {
    #[command(flatten)]
    source: ModelSourceArgs,
    /// float32 .npy batch, already preprocessed: [N, 1, 28, 28] for SimpleCNN,
    /// [N, 3, H, W] for ResNets.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "image",
        requires = "output"
    )]
    input: Option<PathBuf>,
    /// Where to write the float32 .npy logits of shape [N, classes].
    #[arg(long, value_name = "FILE", requires = "input")]
    output: Option<PathBuf>,
    /// A .png/.jpg image, or a directory of them, to classify with a ResNet (resized,
    /// centre-cropped and normalised as torchvision evaluates); prints the top classes.
    #[arg(long, value_name = "PATH", conflicts_with = "input")]
    image: Option<PathBuf>,
    /// Side of the crop for --image [default: the fine-tuned checkpoint's, else 224].
    #[arg(long, value_name = "SIZE", requires = "image")]
    image_size: Option<usize>,
    /// Classes printed per image with --image.
    #[arg(long, value_name = "K", default_value_t = 5, requires = "image")]
    top: usize,
}

/// Parses the command line, with the keys of a `--config FILE` as flags where the command
/// line does not give them; clap's own errors (and `--help`) exit here as usual.
///
/// # Errors
/// A configuration file that cannot be read or holds a bad key.
pub fn parse(argv: Vec<OsString>) -> anyhow::Result<(Cli, ResolvedConfig)> {
    let (argv, from_file) = expand(&Cli::command(), argv)?;
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| {
            if !from_file.is_empty() && e.use_stderr() {
                eprintln!("(--config gave: {})", from_file.join(" "));
            }
            e.exit()
        });
    let resolved = ResolvedConfig::of(&Cli::command(), &matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((cli, resolved))
}

/// Runs the parsed command; the exit code is non-zero when a launched job failed.
/// `resolved` is its configuration, printed by `--print-config` and written into a run's
/// directory.
pub fn run(cli: Cli, resolved: ResolvedConfig) -> anyhow::Result<ExitCode> {
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Bar
    };
    match cli.command {
        Command::Train(TrainRecipe::CnnMnist(args)) => {
            let mut config = args.to_config(verbosity)?;
            if args.config.print_config {
                let trainer = kiln_recipes::cnn_mnist::resolved_trainer_config(&config)?;
                return print_config(resolved, &trainer);
            }
            config.run_config = Some(resolved);
            let timeout = config.collective_timeout;
            train_launched("cnn-mnist", timeout, cli.json, |group| {
                config.process_group = group;
                kiln_recipes::cnn_mnist::run(&config)
            })?;
        }
        Command::Train(TrainRecipe::Gpt(args)) => {
            let mut config = args.to_config(verbosity)?;
            if args.config.print_config {
                let trainer = kiln_recipes::gpt::resolved_trainer_config(&config)?;
                return print_config(resolved, &trainer);
            }
            config.run_config = Some(resolved);
            let timeout = config.collective_timeout;
            train_launched("gpt", timeout, cli.json, |group| {
                config.process_group = group;
                kiln_recipes::gpt::run(&config)
            })?;
        }
        Command::Generate(args) => generate(&args, cli.json)?,
        Command::Launch(args) => return launch::run(&args),
        Command::Collectives(args) => collectives::run(&args, cli.json)?,
        Command::CheckDevice(args) => check_device::run(&args, cli.json)?,
        Command::Bench(args) => bench::run(&args, cli.json, cli.quiet)?,
        Command::Runs(args) => runs::run(&args, cli.json)?,
        Command::Plot(args) => plot::run(&args, cli.json)?,
        Command::Eval(args) => {
            let report = kiln_recipes::inference::eval(
                &model_source(&args.source)?,
                args.data.as_deref(),
                args.batch_size,
                args.source.device,
            )
            .context("evaluation failed")?;
            println!("{}", report.stdout_line(cli.json)?);
        }
        Command::Finetune(args) => {
            let mut config = args.to_config(verbosity)?;
            if args.config.print_config {
                let trainer = kiln_recipes::finetune::resolved_trainer_config(&config)?;
                return print_config(resolved, &trainer);
            }
            config.run_config = Some(resolved);
            stop_on_signals()?;
            let report = kiln_recipes::finetune::run(&config).context("fine-tuning failed")?;
            println!("{}", report.stdout_line(cli.json)?);
        }
        Command::Quantize(args) => {
            if args.config.print_config {
                print!("{}", resolved.to_toml(false));
                return Ok(ExitCode::SUCCESS);
            }
            let config = args.to_config().context(
                "name a model: --checkpoint PATH, or --model simple-cnn with --weights FILE",
            )?;
            let report = kiln_recipes::quantize::run(&config).context("quantization failed")?;
            println!("{}", report.stdout_line(cli.json)?);
        }
        Command::Predict(args) => {
            let source = model_source(&args.source)?;
            let line = match (&args.image, &args.input, &args.output) {
                (Some(image), _, _) => kiln_recipes::inference::predict_images(
                    &source,
                    image,
                    args.image_size,
                    args.top,
                    args.source.device,
                )
                .context("prediction failed")?
                .stdout_line(cli.json)?,
                (None, Some(input), Some(output)) => {
                    kiln_recipes::inference::predict(&source, input, output, args.source.device)
                        .context("prediction failed")?
                        .stdout_line(cli.json)?
                }
                _ => anyhow::bail!("give --input X.npy --output LOGITS.npy, or --image PATH"),
            };
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a training recipe; under `kiln launch` this process is one rank: it trains with the
/// job's group and only rank 0 prints the report. A stop (SIGTERM) is not a failure of the
/// job: every rank stopped at the same step, so each leaves the MPI job normally and then
/// reports it.
fn train_launched<R: Report>(
    name: &str,
    timeout: std::time::Duration,
    json: bool,
    run: impl FnOnce(Option<std::sync::Arc<dyn kiln_multi::Collective>>) -> kiln_recipes::Result<R>,
) -> anyhow::Result<()> {
    stop_on_signals()?;
    let stopped = run_as_launched(timeout, |group| -> anyhow::Result<_> {
        let is_root = group.as_ref().is_none_or(|g| g.rank() == Rank::ZERO);
        let report = match run(group) {
            Err(kiln_recipes::RecipeError::Train(
                stop @ kiln_trainer::TrainError::Stopped { .. },
            )) => return Ok(Some(stop)),
            other => other.with_context(|| format!("training {name} failed"))?,
        };
        if is_root {
            println!("{}", report.stdout_line(json)?);
        }
        Ok(None)
    })?;
    match stopped {
        Some(stop) => Err(anyhow::Error::new(stop).context(format!("training {name} stopped"))),
        None => Ok(()),
    }
}

/// `kiln generate`: the text streams to stdout as it is drawn (or one JSON object with
/// `--json`), the speed to stderr.
fn generate(args: &GenerateArgs, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let config = args.to_config()?;
    let mut stdout = std::io::stdout().lock();
    if !json {
        write!(stdout, "{}", config.prompt)?;
    }
    let report = kiln_recipes::gpt::generate(&config, |piece| {
        if !json {
            // A closed pipe (`| head`) ends the output, not the sampling's error handling.
            let _ = write!(stdout, "{piece}").and_then(|()| stdout.flush());
        }
    })
    .context("generation failed")?;
    if json {
        writeln!(stdout, "{}", report.stdout_line(true)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!("{}", report.summary());
    }
    Ok(())
}

/// SIGTERM and SIGINT stop a training run after its current step, at a checkpoint (the
/// other commands keep the signals' default effect).
fn stop_on_signals() -> anyhow::Result<()> {
    kiln_trainer::StopSignal::install_handlers().context("cannot install the SIGTERM handler")
}

/// The exit status of a failed command: 128 + the signal for a run stopped by one (as a
/// shell reports a process killed by it), 1 otherwise.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    use kiln_recipes::RecipeError;
    use kiln_trainer::TrainError;
    let signal = |e: &(dyn std::error::Error + 'static)| {
        let train =
            e.downcast_ref::<TrainError>()
                .or_else(|| match e.downcast_ref::<RecipeError>() {
                    Some(RecipeError::Train(train)) => Some(train),
                    _ => None,
                });
        match train {
            Some(TrainError::Stopped { signal, .. }) => u8::try_from(128 + signal).ok(),
            _ => None,
        }
    };
    error.chain().find_map(signal).unwrap_or(1)
}

/// `--print-config` of a training command: its flags with the trainer settings they resolve.
fn print_config(
    resolved: ResolvedConfig,
    trainer: &kiln_trainer::TrainerConfig,
) -> anyhow::Result<ExitCode> {
    print!("{}", resolved.with_trainer(trainer).to_toml(false));
    Ok(ExitCode::SUCCESS)
}

fn model_source(args: &ModelSourceArgs) -> anyhow::Result<kiln_recipes::inference::ModelSource> {
    args.to_source()
        .context("name a model: --checkpoint PATH, or --model NAME with --weights FILE")
}
