//! Data sets, batching and file formats.

mod base;
mod folder;
mod mnist;
mod npy;
mod transform;

pub use base::{ImageBatch, ImageDataset, make_batch, make_training_batch};
pub use folder::{Augment, IMAGENET_MEAN, IMAGENET_STD, ImageFolder};
pub use mnist::{MnistDataset, MnistSplit};
pub use npy::{NpyArray, read_npy_f32, write_npy_f32};
pub use transform::Normalize;
