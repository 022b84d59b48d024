//! Kiln: a Rust training framework on Burn.
//!
//! This facade re-exports the workspace crates under short names:
//! - [`multi`] (`kiln-multi`): ranks, samplers, and the multi-device layer;
//! - [`trainer`] (`kiln-trainer`): data, the training loop, checkpoints, reports;
//! - [`models`] (`kiln-models`): SimpleCNN and PyTorch weight import;
//! - [`kernels`] (`kiln-kernels`): CPU convolution and max-pool kernels the models run on Flex;
//! - [`learner`] (`kiln-learner`): kiln's data parallelism as a burn-train training strategy;
//! - [`recipes`] (`kiln-recipes`): reproducible workflows such as cnn-mnist.
//!
//! The `kiln` binary (`src/main.rs`) is the command-line front end of the recipes;
//! [`fuzz`] is the mutation fuzzer of kiln's file readers (`benches/fuzz_readers.rs`).

pub use kiln_kernels as kernels;
pub use kiln_learner as learner;
pub use kiln_models as models;
pub use kiln_multi as multi;
pub use kiln_recipes as recipes;
pub use kiln_trainer as trainer;

pub mod fuzz;
