//! End-to-end tests of kiln, in one binary to keep link time down.
//!
//! - `parity`: SimpleCNN against PyTorch fixtures (forward through `kiln predict`, training
//!   steps through the trainer);
//! - `cli`: bad input gives a clear error and a non-zero exit, never a panic;
//! - `training`: the cnn-mnist recipe learns, and `--resume` reproduces an uninterrupted run;
//! - `data_parallel`: training on N ranks equals one device, through the trainer and the CLI;
//! - `fuzz`: the reader fuzzer's regression inputs and a short seeded pass;
//! - `experiments`: `--config` files (a run's `config.toml` reproduces it; bad files name the
//!   key and line), `kiln runs` (finished vs killed runs) and `kiln plot`;
//! - `gpt`: the GPT against PyTorch (logits, AdamW steps), `kiln train gpt` and
//!   `kiln generate` end to end;
//! - `finetune`: ResNet-18 fine-tuned on the shipped image folder from PyTorch weights,
//!   frozen or not, resumed exactly; bad input fails cleanly;
//! - `kernels`: kiln's CPU convolution and max-pool kernels against Burn's ops, forward and
//!   gradients;
//! - `launch`: `kiln launch` and multi-process training over MPI (feature `mpi`);
//! - `pipeline`: training through 2 or 3 pipeline stages equals one device, for every schedule;
//! - `quantize`: int8/int4 files against PyTorch's quantizers, `kiln quantize` reports,
//!   quantization-aware training;
//! - `resnet`: torchvision ResNet-18 weights from PyTorch give PyTorch's logits.

/// Measures the largest allocation of each input the reader fuzzer's tests read
/// (`kiln::fuzz`); every other test allocates as usual.
#[global_allocator]
static ALLOCATOR: kiln::fuzz::TrackingAllocator = kiln::fuzz::TrackingAllocator;

mod cli;
mod common;
mod data_parallel;
mod experiments;
mod fault;
mod finetune;
mod fuzz;
mod general;
mod gpt;
mod kernels;
mod launch;
mod learner;
mod parity;
mod pipeline;
mod quantize;
mod resnet;
mod training;
