//! `kiln-recipes`: reproducible workflows, each a config struct and a `run` function.
//!
//! - [`cnn_mnist`]: SimpleCNN on MNIST with SGD (lr 0.01, momentum 0.9, batch 64), 5 epochs on
//!   the embedded subset by default;
//! - [`finetune`]: a torchvision ResNet fine-tuned on an image folder, head replaced;
//! - [`gpt`]: a byte-level GPT trained on a text (Tiny Shakespeare by default), and sampling
//!   from it (`kiln generate`);
//! - [`inference`]: evaluation and prediction from a checkpoint or from PyTorch weights;
//! - [`quantize`]: post-training int8/int4 quantization of a checkpoint and its report;
//! - [`distributed`]: running a recipe as one rank of a job started by `kiln launch`, `mpirun`
//!   or `torchrun`;
//! - [`cli`]: the clap argument structs shared by the `kiln` CLI and the recipe binaries;
//! - [`config_file`]: `--config FILE.toml`, `--print-config` and a run's `config.toml`;
//! - [`plot`]: the curves of runs as a PNG (`kiln plot`, a run's `curves.png`);
//! - [`report`]: the serialisable results printed by `--json`;
//! - [`run_info`]: what checkpoints record, as types ([`run_info::ModelName`], each recipe's
//!   options);
//! - [`bench`]: the ResNet-18 throughput workloads of `kiln bench` and `benches/`, and the
//!   PyTorch twin runner.
//!
//! Recipes assemble models, data and the trainer; they contain no training loop.

pub mod bench;
pub mod cli;
pub mod cnn_mnist;
pub mod config_file;
pub mod distributed;
mod error;
pub mod finetune;
pub mod gpt;
pub mod inference;
pub mod mnist_data;
pub mod plot;
pub mod quantize;
pub mod report;
pub mod run_info;

pub use error::{RecipeError, Result};
