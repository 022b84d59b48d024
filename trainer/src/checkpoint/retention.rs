//! Which epoch checkpoints a run keeps: the last few, and its best epoch by a validation
//! figure, so that a long run cannot fill a disk by surprise (ResNet checkpoints are 45-90 MB).

use std::num::NonZeroUsize;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::EpochMetrics;
use super::resume::list_checkpoints;
use crate::error::{Result, TrainError};

/// How a run's epoch checkpoints are thinned out after each epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep the checkpoints of the last this many epochs; `None` keeps every epoch's.
    pub keep_last: Option<NonZeroUsize>,
    /// Also keep the best epoch's checkpoint by this figure.
    pub keep_best: KeepBest,
}

impl Default for Retention {
    /// The last 5 epochs and the best one: at most 6 checkpoints, however long the run.
    fn default() -> Self {
        Self {
            keep_last: NonZeroUsize::new(5),
            keep_best: KeepBest::Auto,
        }
    }
}

/// The validation figure that names a run's best epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepBest {
    /// Validation accuracy (highest) where the run reports it, else validation loss (lowest).
    Auto,
    /// The lowest value of `loss` or of a validation metric (`mae`).
    Min(String),
    /// The highest value of `accuracy` or of a validation metric.
    Max(String),
    /// No best epoch is kept beyond the last ones.
    None,
}

impl FromStr for KeepBest {
    type Err = String;

    /// `auto`, `none`, `min:NAME` or `max:NAME`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.split_once(':') {
            _ if text == "auto" => Ok(KeepBest::Auto),
            _ if text == "none" => Ok(KeepBest::None),
            Some(("min", name)) if !name.is_empty() => Ok(KeepBest::Min(name.into())),
            Some(("max", name)) if !name.is_empty() => Ok(KeepBest::Max(name.into())),
            _ => Err(format!(
                "expected auto, none, min:METRIC or max:METRIC (e.g. max:accuracy, min:loss), \
                 got {text:?}"
            )),
        }
    }
}

impl std::fmt::Display for KeepBest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepBest::Auto => f.write_str("auto"),
            KeepBest::None => f.write_str("none"),
            KeepBest::Min(name) => write!(f, "min:{name}"),
            KeepBest::Max(name) => write!(f, "max:{name}"),
        }
    }
}

/// An epoch's validation figure called `name`: `loss`, `accuracy`, or one of its metrics.
fn figure(m: &EpochMetrics, name: &str) -> Option<f64> {
    match name {
        "loss" => Some(m.test_loss),
        "accuracy" => m.test_accuracy,
        other => m.test_metrics.get(other).copied(),
    }
}

impl KeepBest {
    /// The best epoch of `history` (1-based), if the figure exists; NaN never wins.
    pub fn best_epoch(&self, history: &[EpochMetrics]) -> Option<usize> {
        let (name, higher) = match self {
            KeepBest::None => return None,
            KeepBest::Auto if history.iter().any(|m| m.test_accuracy.is_some()) => {
                ("accuracy", true)
            }
            KeepBest::Auto => ("loss", false),
            KeepBest::Min(name) => (name.as_str(), false),
            KeepBest::Max(name) => (name.as_str(), true),
        };
        history
            .iter()
            .filter_map(|m| {
                figure(m, name)
                    .filter(|v| !v.is_nan())
                    .map(|v| (m.epoch, v))
            })
            .reduce(|best, next| {
                let better = if higher {
                    next.1 > best.1
                } else {
                    next.1 < best.1
                };
                if better { next } else { best }
            })
            .map(|(epoch, _)| epoch)
    }
}

/// Removes the epoch checkpoints of `run_dir` that `retention` does not keep, after the
/// checkpoint of the last epoch of `history` was written; mid-epoch files are not touched.
///
/// # Errors
/// [`TrainError::Io`] when the directory cannot be listed or a file removed.
pub(crate) fn apply(run_dir: &Path, retention: &Retention, history: &[EpochMetrics]) -> Result<()> {
    let Some(keep_last) = retention.keep_last else {
        return Ok(());
    };
    let last = history.len();
    let best = retention.keep_best.best_epoch(history);
    for ((epoch, step), path) in list_checkpoints(run_dir)? {
        let kept = epoch + keep_last.get() > last || Some(epoch) == best;
        if step == 0 && !kept {
            std::fs::remove_file(&path).map_err(|e| TrainError::io("remove", &path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, loss: f64, accuracy: Option<f64>) -> EpochMetrics {
        EpochMetrics {
            epoch,
            step: epoch as u64,
            train_loss: 1.0,
            test_loss: loss,
            test_accuracy: accuracy,
            train_metrics: Default::default(),
            test_metrics: [("mae".to_string(), loss / 2.0)].into(),
            samples_per_sec: 1.0,
            train_seconds: 1.0,
            bubble_fraction: None,
            exchange_fraction: None,
        }
    }

    #[test]
    fn the_last_epochs_and_the_best_stay() {
        let dir = tempfile::tempdir().unwrap();
        let losses = [0.9, 0.2, f64::NAN, 0.5, 0.6, 0.7];
        let history: Vec<_> = (1..=6).map(|e| epoch(e, losses[e - 1], None)).collect();
        for e in 1..=6 {
            let path = super::super::checkpoint_path(dir.path(), e);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        let retention = Retention {
            keep_last: NonZeroUsize::new(2),
            keep_best: KeepBest::Auto,
        };
        apply(dir.path(), &retention, &history).unwrap();
        let left: Vec<usize> = list_checkpoints(dir.path())
            .unwrap()
            .into_iter()
            .map(|((e, _), _)| e)
            .collect();
        assert_eq!(
            left,
            [2, 5, 6],
            "epoch 2 has the lowest loss; NaN never wins"
        );
        assert_eq!(KeepBest::Max("mae".into()).best_epoch(&history), Some(1));
        let with_accuracy = [epoch(1, 0.1, Some(0.5)), epoch(2, 0.3, Some(0.7))];
        assert_eq!(KeepBest::Auto.best_epoch(&with_accuracy), Some(2));
        assert_eq!("min:mae".parse(), Ok(KeepBest::Min("mae".into())));
        assert!("best".parse::<KeepBest>().is_err());
    }
}
