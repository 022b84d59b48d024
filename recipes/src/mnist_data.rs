//! Where MNIST comes from: the subset embedded in the binary, or IDX files in a directory.
//!
//! The embedded subset is `data/mnist/` of the repository (10,000 real MNIST digits, 8,004
//! train / 1,996 test; provenance in `data/mnist/PROVENANCE.md`). A directory given with
//! `--data` must hold the standard file names (`train-images-idx3-ubyte[.gz]`, ...), so the
//! full 60k/10k MNIST loads the same way.

use std::path::{Path, PathBuf};

use kiln_trainer::data::{MnistDataset, MnistSplit};

use crate::error::Result;

const TRAIN_IMAGES: &[u8] = include_bytes!("../../data/mnist/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] = include_bytes!("../../data/mnist/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] = include_bytes!("../../data/mnist/t10k-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] = include_bytes!("../../data/mnist/t10k-labels-idx1-ubyte.gz");

/// Where to read MNIST from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MnistSource {
    /// The subset compiled into the binary.
    #[default]
    Embedded,
    /// A directory of IDX files (gzip or raw) with the standard names.
    Dir(PathBuf),
}

impl MnistSource {
    /// `Dir(path)` if a path is given, else `Embedded`.
    pub fn from_option(dir: Option<&Path>) -> Self {
        dir.map_or(Self::Embedded, |d| Self::Dir(d.to_path_buf()))
    }

    /// Loads one split.
    ///
    /// # Errors
    /// A data error naming the file when it is missing, corrupt or inconsistent.
    pub fn load(&self, split: MnistSplit) -> Result<MnistDataset> {
        match self {
            MnistSource::Dir(dir) => Ok(MnistDataset::from_dir(dir, split)?),
            MnistSource::Embedded => {
                let (images, labels) = match split {
                    MnistSplit::Train => (TRAIN_IMAGES, TRAIN_LABELS),
                    MnistSplit::Test => (TEST_IMAGES, TEST_LABELS),
                };
                let [images_name, labels_name] = split.file_names();
                let embedded = |name: &str| PathBuf::from(format!("<embedded>/{name}.gz"));
                Ok(MnistDataset::from_idx_bytes(
                    &embedded(&images_name),
                    images,
                    &embedded(&labels_name),
                    labels,
                )?)
            }
        }
    }

    /// A short description for logs and reports.
    pub fn describe(&self) -> String {
        match self {
            MnistSource::Embedded => "embedded MNIST subset".into(),
            MnistSource::Dir(dir) => dir.display().to_string(),
        }
    }
}
