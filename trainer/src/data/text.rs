//! Byte-level language-model data: a text (any file: its bytes are the tokens 0..=255) split
//! into a training and a validation part, each cut into windows of `block + 1` tokens, the
//! inputs and their next tokens, through Burn's `Dataset` and `Batcher`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Result, TrainError};

/// Tokens of a byte-level model: one per byte value.
pub const BYTE_VOCAB: usize = 256;

/// A text read as bytes.
#[derive(Debug, Clone)]
pub struct ByteCorpus {
    bytes: Arc<[u8]>,
    source: PathBuf,
}

impl ByteCorpus {
    /// A corpus of `bytes`; `source` names it in errors (a file, or an embedded text's name).
    pub fn new(bytes: impl Into<Arc<[u8]>>, source: impl Into<PathBuf>) -> Self {
        Self {
            bytes: bytes.into(),
            source: source.into(),
        }
    }

    /// The bytes of the file at `path`.
    ///
    /// # Errors
    /// [`TrainError::Io`] naming the file when it cannot be read.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::new(bytes, path))
    }

    /// Bytes in the text.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Where the text came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The training windows (the first `1 - validation` of the text) and the validation
    /// windows (the rest; nanoGPT splits 90/10), each of `block + 1` tokens, one every `block`
    /// tokens, so every token but the first of each part is a target once.
    ///
    /// # Errors
    /// [`TrainError::Data`] naming the text when a part holds no whole window;
    /// [`TrainError::Config`] for a zero block or a fraction outside (0, 1).
    pub fn split(&self, block: usize, validation: f64) -> Result<(TokenWindows, TokenWindows)> {
        if block == 0 {
            return Err(TrainError::Config {
                field: "--block-size",
                reason: "must be above 0".into(),
            });
        }
        if !(validation > 0.0 && validation < 1.0) {
            return Err(TrainError::Config {
                field: "--validation",
                reason: format!("must be between 0 and 1, got {validation}"),
            });
        }
        let boundary = ((self.len() as f64) * (1.0 - validation)).round() as usize;
        let part = |range: std::ops::Range<usize>, name: &str| {
            let count = range.len().saturating_sub(1) / block;
            if count == 0 {
                return Err(TrainError::Data {
                    path: self.source.clone(),
                    reason: format!(
                        "its {name} part ({} bytes of {}) holds no window of {} bytes: \
                         use a longer text or a smaller --block-size",
                        range.len(),
                        self.len(),
                        block + 1
                    ),
                });
            }
            Ok(TokenWindows {
                bytes: Arc::clone(&self.bytes),
                start: range.start,
                count,
                block,
            })
        };
        Ok((
            part(0..boundary, "training")?,
            part(boundary..self.len(), "validation")?,
        ))
    }
}

/// Windows of `block + 1` tokens of a part of a [`ByteCorpus`]: item `i` starts at token
/// `start + i * block`.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    bytes: Arc<[u8]>,
    start: usize,
    count: usize,
    block: usize,
}

impl TokenWindows {
    /// Tokens each window's inputs hold.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The first `count` windows only (quick checks).
    pub fn limit(mut self, count: usize) -> Self {
        self.count = self.count.min(count);
        self
    }
}

/// `block + 1` consecutive tokens: the inputs are all but the last, the targets all but the
/// first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenWindow {
    /// The tokens.
    pub tokens: Vec<u32>,
}

impl Dataset<TokenWindow> for TokenWindows {
    fn get(&self, index: usize) -> std::result::Result<TokenWindow, DatasetError> {
        if index >= self.count {
            return Err(DatasetError::new(std::io::Error::other(format!(
                "window {index} of {}",
                self.count
            ))));
        }
        let from = self.start + index * self.block;
        Ok(TokenWindow {
            tokens: self.bytes[from..=from + self.block]
                .iter()
                .map(|&b| u32::from(b))
                .collect(),
        })
    }

    fn len(&self) -> usize {
        self.count
    }
}

/// A batch of windows: `inputs` and `targets` `[batch, block]`, `targets` one token ahead.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Tokens the model reads.
    pub inputs: Tensor<2, Int>,
    /// The token after each input token.
    pub targets: Tensor<2, Int>,
}

/// Burn's batcher for [`TokenWindow`]s of equal length.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBatcher;

impl Batcher<TokenWindow, TokenBatch> for TokenBatcher {
    fn batch(&self, items: Vec<TokenWindow>, device: &Device) -> TokenBatch {
        let n = items.len();
        let t = items
            .first()
            .map_or(0, |w| w.tokens.len().saturating_sub(1));
        let take = |skip: usize| -> Vec<i64> {
            items
                .iter()
                .flat_map(|w| w.tokens[skip..skip + t].iter().map(|&x| i64::from(x)))
                .collect()
        };
        let tensor = |values| Tensor::<2, Int>::from_data(TensorData::new(values, [n, t]), device);
        TokenBatch {
            inputs: tensor(take(0)),
            targets: tensor(take(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_each_part_and_targets_are_one_ahead() {
        let text: Vec<u8> = (0..=100).collect();
        let corpus = ByteCorpus::new(text, "numbers");
        // 101 bytes: training 0..91, validation 91..101.
        let (train, val) = corpus.split(9, 0.1).unwrap();
        assert_eq!((train.len(), val.len()), (10, 1));
        let second = train.get(1).unwrap().tokens;
        assert_eq!(second, (9..=18).collect::<Vec<u32>>());
        assert_eq!(val.get(0).unwrap().tokens, (91..=100).collect::<Vec<u32>>());
        assert!(train.get(10).is_err());
        let items = vec![train.get(0).unwrap(), train.get(1).unwrap()];
        let batch = TokenBatcher.batch(items, &Device::flex());
        let inputs = batch
            .inputs
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        let targets = batch
            .targets
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        assert_eq!(&inputs[..9], &[0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&targets[9..], &[10, 11, 12, 13, 14, 15, 16, 17, 18]);
    }

    #[test]
    fn a_text_too_short_for_a_window_names_its_source() {
        let corpus = ByteCorpus::new(b"short text".to_vec(), "tiny.txt");
        let error = corpus.split(64, 0.1).unwrap_err().to_string();
        assert!(
            error.contains("tiny.txt") && error.contains("--block-size"),
            "{error}"
        );
        let error = corpus.split(2, 1.5).unwrap_err().to_string();
        assert!(error.contains("--validation"), "{error}");
    }
}
