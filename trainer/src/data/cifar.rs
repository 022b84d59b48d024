//! CIFAR-10 in its binary form (`cifar-10-batches-bin/`): `data_batch_1.bin` ...
//! `data_batch_5.bin` for training, `test_batch.bin` for testing; each record is one label
//! byte and 3,072 pixel bytes (the red, green and blue 32x32 planes, row-major).
//! Samples are `[3, 32, 32]`, ImageNet-normalised like torchvision's pretrained models expect;
//! training flips them left-right half of the time, drawn from (seed, epoch, index).

use std::path::{Path, PathBuf};

use super::base::ImageDataset;
use super::folder::{IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Result, TrainError};

/// CIFAR-10's classes in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// Side of a CIFAR image.
const SIDE: usize = 32;
/// Bytes of one record: label plus three planes.
const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// Training batch files.
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// Test batch file.
const TEST_FILE: &str = "test_batch.bin";

/// Which part of CIFAR-10 to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarSplit {
    /// The training batches present in the directory (all five for the full set).
    Train,
    /// `test_batch.bin`.
    Test,
}

/// CIFAR-10 records held in memory.
#[derive(Debug, Clone)]
pub struct Cifar10 {
    records: Vec<u8>,
    flip_seed: Option<u64>,
}

impl Cifar10 {
    /// Whether `dir` looks like CIFAR-10's binary directory.
    pub fn is_cifar_dir(dir: &Path) -> bool {
        dir.join(TRAIN_FILES[0]).is_file()
    }

    /// Reads a split from `dir`; `flip_seed` turns on training flips.
    ///
    /// # Errors
    /// [`TrainError::Data`] naming the file when it is missing, not a whole number of records,
    /// or holds a label above 9.
    pub fn open(dir: &Path, split: CifarSplit, flip_seed: Option<u64>) -> Result<Self> {
        let files: Vec<PathBuf> = match split {
            CifarSplit::Train => TRAIN_FILES
                .iter()
                .map(|f| dir.join(f))
                .take_while(|p| p.is_file())
                .collect(),
            CifarSplit::Test => vec![dir.join(TEST_FILE)],
        };
        if files.is_empty() || !files[0].is_file() {
            let name = files
                .first()
                .map_or_else(|| dir.join(TRAIN_FILES[0]), Clone::clone);
            return Err(TrainError::data(
                name,
                "no such file (CIFAR-10 binary version)",
            ));
        }
        let mut records = Vec::new();
        for file in &files {
            let bytes = std::fs::read(file).map_err(|e| TrainError::io("read", file, e))?;
            if bytes.is_empty() || bytes.len() % RECORD != 0 {
                return Err(TrainError::data(
                    file,
                    format!(
                        "{} bytes is not a whole number of {RECORD}-byte records (truncated?)",
                        bytes.len()
                    ),
                ));
            }
            if let Some(bad) = bytes.chunks_exact(RECORD).map(|r| r[0]).find(|&l| l > 9) {
                return Err(TrainError::data(
                    file,
                    format!("label {bad} is not a CIFAR-10 class"),
                ));
            }
            records.extend(bytes);
        }
        Ok(Self { records, flip_seed })
    }

    fn write(&self, index: usize, flip: bool, pixels: &mut [f32]) -> usize {
        let record = &self.records[index * RECORD..(index + 1) * RECORD];
        let plane = SIDE * SIDE;
        for c in 0..3 {
            for row in 0..SIDE {
                for col in 0..SIDE {
                    let source = if flip { SIDE - 1 - col } else { col };
                    let value = f32::from(record[1 + c * plane + row * SIDE + source]);
                    pixels[c * plane + row * SIDE + col] =
                        (value / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                }
            }
        }
        usize::from(record[0])
    }
}

impl ImageDataset for Cifar10 {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }

    fn image_shape(&self) -> [usize; 3] {
        [3, SIDE, SIDE]
    }

    fn sample(&self, index: usize, pixels: &mut [f32]) -> usize {
        self.write(index, false, pixels)
    }

    fn training_sample(&self, index: usize, epoch: usize, pixels: &mut [f32]) -> usize {
        let flip = self.flip_seed.is_some_and(|seed| {
            let mut z = seed ^ ((epoch as u64) << 32) ^ index as u64;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) & 1 == 1
        });
        self.write(index, flip, pixels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose pixel at (c, row, col) is `c * 100 + col` and whose label is `label`.
    fn record(label: u8) -> Vec<u8> {
        let mut r = vec![label];
        for c in 0..3u8 {
            for _row in 0..SIDE {
                r.extend((0..SIDE as u8).map(|col| c * 100 + col));
            }
        }
        r
    }

    #[test]
    fn records_decode_to_normalised_planes_and_flip() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = [record(3), record(9)].concat();
        std::fs::write(dir.path().join("data_batch_1.bin"), &bytes).unwrap();
        std::fs::write(dir.path().join("test_batch.bin"), record(0)).unwrap();
        assert!(Cifar10::is_cifar_dir(dir.path()));
        let train = Cifar10::open(dir.path(), CifarSplit::Train, Some(5)).unwrap();
        assert_eq!(train.len(), 2);
        let mut p = vec![0.0; 3 * SIDE * SIDE];
        assert_eq!(train.sample(1, &mut p), 9);
        // Green plane, row 0, col 7: value 107.
        let expected = (107.0 / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
        assert!((p[SIDE * SIDE + 7] - expected).abs() < 1e-6);
        let mut flips = 0;
        for epoch in 0..16 {
            let mut q = vec![0.0; 3 * SIDE * SIDE];
            train.training_sample(0, epoch, &mut q);
            if q[0] > p[0] {
                flips += 1;
                assert_eq!(q[0], p[SIDE - 1]);
            }
        }
        assert!((1..16).contains(&flips), "{flips} flips in 16 epochs");
        assert_eq!(
            Cifar10::open(dir.path(), CifarSplit::Test, None)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn truncated_files_and_bad_labels_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(1);
        bytes.pop();
        std::fs::write(dir.path().join("data_batch_1.bin"), &bytes).unwrap();
        let err = Cifar10::open(dir.path(), CifarSplit::Train, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data_batch_1.bin") && err.contains("truncated"),
            "{err}"
        );
        std::fs::write(dir.path().join("data_batch_1.bin"), record(12)).unwrap();
        let err = Cifar10::open(dir.path(), CifarSplit::Train, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 12"), "{err}");
        let err = Cifar10::open(dir.path(), CifarSplit::Test, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("test_batch.bin"), "{err}");
    }
}
