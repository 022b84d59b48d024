//! Kiln's models, built on Burn modules with PyTorch's parameter names so that a PyTorch
//! `state_dict` loads as it is (torchvision's `downsample.0/1` is the one mapping).
//!
//! - [`SimpleCnn`]: the two-convolution MNIST network of PyTorch's tutorials, and its parts as
//!   modules for pipeline stages.
//! - [`resnet`]: torchvision's ResNet-18/34/50.
//! - [`gpt`]: a GPT-style decoder-only transformer (nanoGPT's names), with cached sampling.
//! - [`quant`]: int8/int4 weight quantization: files, fake quantization for QAT.
//! - [`import`]: strict loading of `.pth` / `.safetensors` weights with a report of what was
//!   applied.
//!
//! This crate depends on Burn only; it knows nothing of training or of devices beyond the
//! [`burn::tensor::Device`] a model is built on.

mod error;
pub mod gpt;
pub mod import;
mod init;
pub mod quant;
pub mod resnet;
mod simple_cnn;

pub use error::{ImportError, Result};
pub use gpt::{Gpt, GptConfig};
pub use import::{ImportReport, LoadOptions, WeightFormat, load_weights, load_weights_with};
pub use resnet::{ResNet, ResNetBack, ResNetDepth, ResNetFront};
pub use simple_cnn::{
    SimpleCnn, SimpleCnnBack, SimpleCnnClassifier, SimpleCnnConfig, SimpleCnnConvBlock,
};
