//! Integration tests of kiln-multi, in one binary to keep link time down.

mod collectives;
mod common;
mod data_parallel;
mod pipeline;
mod tensor_parallel;
