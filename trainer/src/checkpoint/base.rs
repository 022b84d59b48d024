use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

use crate::config::TrainerConfig;

/// Metrics of one finished epoch, as written to `metrics.jsonl` and kept in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Optimizer steps taken since the start of the run, after this epoch.
    pub step: u64,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Mean test loss.
    pub test_loss: f64,
    /// Fraction of test samples classified correctly: the evaluation step's `accuracy`
    /// metric, where it reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// The training step's other metrics over the epoch, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train_metrics: BTreeMap<String, f64>,
    /// The evaluation step's other metrics, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub test_metrics: BTreeMap<String, f64>,
    /// Training samples per second, evaluation excluded.
    pub samples_per_sec: f64,
    /// Seconds spent training in this epoch, evaluation excluded.
    pub train_seconds: f64,
    /// Pipeline runs: the mean measured idle fraction of the stages over the epoch's steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bubble_fraction: Option<f64>,
    /// Data-parallel runs: the fraction of the training time this rank (the reporting one)
    /// spent exchanging gradients (under ZeRO, the sharded update and its all-gather too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_fraction: Option<f64>,
}

impl EpochMetrics {
    /// Training samples per second over all of `history`, evaluation excluded: total samples
    /// over total training time (0 for an empty history).
    pub fn throughput(history: &[EpochMetrics]) -> f64 {
        let samples: f64 = history
            .iter()
            .map(|m| m.samples_per_sec * m.train_seconds)
            .sum();
        let seconds: f64 = history.iter().map(|m| m.train_seconds).sum();
        if seconds > 0.0 {
            samples / seconds
        } else {
            0.0
        }
    }
}

/// Everything about a run that is not a tensor: enough to resume it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The recipe that produced the run (`cnn-mnist`).
    pub recipe: String,
    /// The model architecture (`simple-cnn`), so that `eval` can rebuild it.
    pub model: String,
    /// The fake quantization the model trained under (quantization-aware training), so that
    /// `eval` and `quantize` apply it again; absent for float training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Recipe settings needed to rebuild the model and read its data (e.g. a fine-tuned
    /// ResNet's `num_classes`, `classes`, `image_size`); empty for cnn-mnist.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, serde_json::Value>,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// The configuration the run was trained with.
    pub config: TrainerConfig,
    /// Metrics of every completed epoch, oldest first.
    pub history: Vec<EpochMetrics>,
    /// A checkpoint written inside an epoch (`--checkpoint-every`, or a stop): how far that
    /// epoch got on each rank. `None` at an epoch's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_epoch: Option<MidEpoch>,
}

/// How far the epoch in progress got when a mid-epoch checkpoint was written: per rank, the
/// optimizer steps, samples, time and metric sums so far, so that the resumed epoch skips the
/// batches done and reports what an uninterrupted epoch does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MidEpoch {
    pub(crate) ranks: Vec<crate::train::epoch::EpochProgress>,
}

impl MidEpoch {
    /// Optimizer steps done in the epoch.
    pub fn steps(&self) -> u64 {
        self.ranks.first().map_or(0, |r| r.steps)
    }

    /// The data-parallel ranks that wrote it.
    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }
}

/// A complete checkpoint: trainer state, model parameters and optimizer state.
///
/// The records are burnpack bytes as produced by Burn's `ModuleRecord::into_bytes` and
/// `OptimizerRecord::into_bytes`; parameter ids tie the optimizer state to the parameters.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Non-tensor state.
    pub state: TrainerState,
    /// The model's parameters.
    pub model: Vec<u8>,
    /// The optimizer's per-parameter state (momentum buffers).
    pub optimizer: Vec<u8>,
}

impl Checkpoint {
    /// Loads the checkpoint's parameters into `model`, which must have the architecture the
    /// checkpoint was written from. `path` names the checkpoint in errors.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] when the record is unreadable or does not fit the model
    /// (missing, unused or mis-shaped tensors).
    pub fn load_model<M: Module>(&self, model: M, path: &Path) -> Result<M> {
        let bad = |e: burn::store::RecordError| TrainError::checkpoint(path, e.to_string());
        let record =
            ModuleRecord::from_bytes(Bytes::from_bytes_vec(self.model.clone())).map_err(bad)?;
        model.try_load_record(record).map_err(bad)
    }
}
