//! Data sets, batching and file formats.

mod base;
mod mnist;
mod npy;
mod transform;

pub use base::{ImageBatch, ImageDataset, make_batch};
pub use mnist::{MnistDataset, MnistSplit};
pub use npy::{NpyArray, read_npy_f32, write_npy_f32};
pub use transform::Normalize;
