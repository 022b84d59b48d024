//! Data sets, batching and file formats: images (MNIST, CIFAR-10, image folders) and
//! byte-level text for language models.

mod base;
mod cifar;
mod folder;
mod mnist;
mod npy;
mod text;
mod transform;

pub use base::{ImageBatch, ImageDataset, make_batch, make_training_batch};
pub use cifar::{CIFAR10_CLASSES, Cifar10, CifarSplit};
pub use folder::{
    Augment, IMAGENET_MEAN, IMAGENET_STD, ImageFolder, is_image_file, load_eval_image,
};
pub use mnist::{MnistDataset, MnistSplit};
pub use npy::{NpyArray, read_npy_f32, write_npy_f32};
pub use text::{BYTE_VOCAB, ByteCorpus, TokenBatch, TokenBatcher, TokenWindow, TokenWindows};
pub use transform::Normalize;
