//! End-to-end tests of kiln, in one binary to keep link time down.
//!
//! - `parity`: SimpleCNN against PyTorch fixtures (forward through `kiln predict`, training
//!   steps through the trainer);
//! - `cli`: bad input gives a clear error and a non-zero exit, never a panic;
//! - `training`: the cnn-mnist recipe learns, and `--resume` reproduces an uninterrupted run.

mod cli;
mod common;
mod parity;
mod training;
