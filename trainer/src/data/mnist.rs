//! MNIST in its IDX form (`train-images-idx3-ubyte[.gz]` and friends).
//!
//! The reader accepts gzip-compressed or raw files, checks the magic numbers, the dimensions,
//! that the payload is exactly as long as the header says, that images and labels agree in
//! count, and that labels are digits. Every error names the file and the problem.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::base::ImageDataset;
use super::transform::Normalize;
use crate::error::{Result, TrainError};

/// IDX magic of an unsigned-byte tensor of rank 3 (images).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic of an unsigned-byte tensor of rank 1 (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;
/// Number of classes in MNIST.
const NUM_CLASSES: u8 = 10;
/// Decompressed files larger than this are refused rather than read into memory
/// (the full training images are 47 MB).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Which half of MNIST to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MnistSplit {
    /// `train-*` files.
    Train,
    /// `t10k-*` files.
    Test,
}

impl MnistSplit {
    fn prefix(self) -> &'static str {
        match self {
            MnistSplit::Train => "train",
            MnistSplit::Test => "t10k",
        }
    }

    /// File names of the images and labels of this split, without a `.gz` suffix.
    pub fn file_names(self) -> [String; 2] {
        [
            format!("{}-images-idx3-ubyte", self.prefix()),
            format!("{}-labels-idx1-ubyte", self.prefix()),
        ]
    }
}

/// MNIST images and labels held in memory as bytes.
#[derive(Debug, Clone)]
pub struct MnistDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    normalize: Normalize,
}

impl MnistDataset {
    /// Reads `split` from `dir`, preferring `NAME.gz` and falling back to the raw `NAME`.
    ///
    /// # Errors
    /// [`TrainError::Data`] when a file is missing, corrupt, truncated or inconsistent.
    pub fn from_dir(dir: &Path, split: MnistSplit) -> Result<Self> {
        let [images_name, labels_name] = split.file_names();
        let images_path = find_file(dir, &images_name)?;
        let labels_path = find_file(dir, &labels_name)?;
        let images = read_file(&images_path)?;
        let labels = read_file(&labels_path)?;
        Self::from_idx_bytes(&images_path, &images, &labels_path, &labels)
    }

    /// Parses an images file and a labels file already in memory (gzip or raw). The paths are
    /// only used to name the files in errors.
    ///
    /// # Errors
    /// [`TrainError::Data`] when a file is corrupt, truncated or inconsistent.
    pub fn from_idx_bytes(
        images_path: &Path,
        images: &[u8],
        labels_path: &Path,
        labels: &[u8],
    ) -> Result<Self> {
        let images_raw = maybe_gunzip(images_path, images)?;
        let labels_raw = maybe_gunzip(labels_path, labels)?;
        let (dims, pixels) = parse_idx(images_path, &images_raw, IMAGES_MAGIC, 3)?;
        let (label_dims, label_bytes) = parse_idx(labels_path, &labels_raw, LABELS_MAGIC, 1)?;
        let (count, rows, cols) = (dims[0], dims[1], dims[2]);
        if rows == 0 || cols == 0 {
            return Err(TrainError::data(
                images_path,
                format!("images of {rows}x{cols} pixels are empty"),
            ));
        }
        if label_dims[0] != count {
            return Err(TrainError::data(
                labels_path,
                format!(
                    "holds {} labels but {} holds {count} images",
                    label_dims[0],
                    images_path.display()
                ),
            ));
        }
        if let Some((i, &bad)) = label_bytes
            .iter()
            .enumerate()
            .find(|(_, l)| **l >= NUM_CLASSES)
        {
            return Err(TrainError::data(
                labels_path,
                format!("label {bad} of sample {i} is not a digit 0-9"),
            ));
        }
        Ok(Self {
            images: pixels.to_vec(),
            labels: label_bytes.to_vec(),
            rows,
            cols,
            normalize: Normalize::MNIST,
        })
    }

    /// The first `n` samples (all of them if there are fewer), for quick runs and tests.
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.labels.len());
        Self {
            images: self.images[..n * self.rows * self.cols].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..self.clone()
        }
    }

    /// Class labels, one per sample.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl ImageDataset for MnistDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        [1, self.rows, self.cols]
    }

    fn sample(&self, index: usize, pixels: &mut [f32]) -> usize {
        let size = self.rows * self.cols;
        let raw = &self.images[index * size..(index + 1) * size];
        for (out, &p) in pixels.iter_mut().zip(raw) {
            *out = self.normalize.apply(p);
        }
        self.labels[index] as usize
    }
}

fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    Err(TrainError::data(
        dir,
        format!("neither {name}.gz nor {name} is in this directory"),
    ))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TrainError::io("read", path, e))
}

fn maybe_gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| TrainError::data(path, format!("gzip stream is corrupt or truncated: {e}")))?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(TrainError::data(path, "decompresses to more than 1 GiB"));
    }
    Ok(out)
}

/// Checks an IDX header and returns its dimensions and its payload.
fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    rank: usize,
) -> Result<(Vec<usize>, &'a [u8])> {
    let header_len = 4 + 4 * rank;
    let read_u32 =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    if bytes.len() >= 4 && read_u32(0) != magic {
        return Err(TrainError::data(
            path,
            format!(
                "wrong magic number 0x{:08x}, expected 0x{magic:08x} (not an IDX file of this kind)",
                read_u32(0)
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(TrainError::data(
            path,
            format!(
                "file is {} bytes, shorter than its {header_len}-byte IDX header (truncated?)",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..rank).map(|d| read_u32(4 + 4 * d) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TrainError::data(path, format!("dimensions {dims:?} overflow")))?;
    let payload = &bytes[header_len..];
    if payload.len() < expected {
        return Err(TrainError::data(
            path,
            format!(
                "header promises {dims:?} = {expected} bytes of data but only {} follow (truncated)",
                payload.len()
            ),
        ));
    }
    if payload.len() > expected {
        return Err(TrainError::data(
            path,
            format!(
                "header promises {dims:?} = {expected} bytes of data but {} follow (extra trailing bytes)",
                payload.len()
            ),
        ));
    }
    Ok((dims, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend(payload);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn check(images: &[u8], labels: &[u8]) -> Result<MnistDataset> {
        MnistDataset::from_idx_bytes(Path::new("imgs"), images, Path::new("lbls"), labels)
    }

    fn err_text(images: &[u8], labels: &[u8]) -> String {
        check(images, labels).unwrap_err().to_string()
    }

    #[test]
    fn reads_raw_and_gzip_alike() {
        let images = idx(IMAGES_MAGIC, &[2, 2, 2], &[0, 255, 0, 0, 1, 2, 3, 4]);
        let labels = idx(LABELS_MAGIC, &[2], &[7, 3]);
        let raw = check(&images, &labels).unwrap();
        let gz = check(&gzip(&images), &gzip(&labels)).unwrap();
        assert_eq!(raw.len(), 2);
        assert_eq!(raw.image_shape(), [1, 2, 2]);
        assert_eq!(raw.labels(), gz.labels());
        let mut pixels = [0.0f32; 4];
        assert_eq!(gz.sample(0, &mut pixels), 7);
        assert_eq!(pixels[1], Normalize::MNIST.apply(255));
    }

    #[test]
    fn wrong_magic_is_named() {
        let labels = idx(LABELS_MAGIC, &[1], &[0]);
        let msg = err_text(&labels, &labels);
        assert!(
            msg.contains("imgs") && msg.contains("wrong magic number 0x00000801"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_payload_header_and_gzip_are_errors() {
        let images = idx(IMAGES_MAGIC, &[2, 2, 2], &[0; 8]);
        let labels = idx(LABELS_MAGIC, &[2], &[1, 2]);
        let msg = err_text(&images[..images.len() - 1], &labels);
        assert!(msg.contains("only 7 follow (truncated)"), "{msg}");
        let msg = err_text(&images[..6], &labels);
        assert!(msg.contains("shorter than its 16-byte IDX header"), "{msg}");
        let msg = err_text(&images[..2], &labels);
        assert!(msg.contains("file is 2 bytes"), "{msg}");
        let gz = gzip(&images);
        let msg = err_text(&gz[..gz.len() / 2], &labels);
        assert!(msg.contains("gzip stream is corrupt or truncated"), "{msg}");
    }

    #[test]
    fn trailing_bytes_count_mismatch_and_bad_labels_are_errors() {
        let images = idx(IMAGES_MAGIC, &[2, 2, 2], &[0; 9]);
        let labels = idx(LABELS_MAGIC, &[2], &[1, 2]);
        assert!(err_text(&images, &labels).contains("extra trailing bytes"));
        let images = idx(IMAGES_MAGIC, &[2, 2, 2], &[0; 8]);
        let msg = err_text(&images, &idx(LABELS_MAGIC, &[3], &[1, 2, 3]));
        assert!(
            msg.contains("lbls") && msg.contains("holds 3 labels but imgs holds 2 images"),
            "{msg}"
        );
        let msg = err_text(&images, &idx(LABELS_MAGIC, &[2], &[1, 12]));
        assert!(msg.contains("label 12 of sample 1"), "{msg}");
    }

    #[test]
    fn missing_directory_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let msg = MnistDataset::from_dir(dir.path(), MnistSplit::Test)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t10k-images-idx3-ubyte.gz"), "{msg}");
    }
}
