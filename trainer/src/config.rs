use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Hyper-parameters of a training run: SGD with momentum over a shuffled data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Total epochs to train (a resumed run continues up to this number).
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Samples per forward pass during evaluation.
    pub eval_batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum (PyTorch's `momentum`, no dampening, no Nesterov).
    pub momentum: f64,
    /// Seed of the model initialisation and of the per-epoch shuffles.
    pub seed: u64,
    /// Parameters whose path starts with a group's prefix train with that group's learning
    /// rate instead of `lr` (PyTorch's parameter groups), e.g. a fine-tuned head; the first
    /// matching group wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_groups: Vec<LrGroup>,
}

/// A learning rate for the parameters under one module path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrGroup {
    /// Path prefix of the parameters, in module field names (`fc.` for a ResNet's head).
    pub prefix: String,
    /// Their learning rate.
    pub lr: f64,
}

impl Default for TrainerConfig {
    /// The cnn-mnist recipe of PyTorch's tutorials: 5 epochs, batch 64, SGD lr 0.01 m 0.9.
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 64,
            eval_batch_size: 256,
            lr: 0.01,
            momentum: 0.9,
            seed: 42,
            lr_groups: Vec::new(),
        }
    }
}

impl TrainerConfig {
    /// The optimizer the trainer runs: SGD with `momentum` (no dampening, not Nesterov, no
    /// weight decay), as PyTorch's `SGD(lr, momentum)`; kiln's [`Sgd`](crate::optim::Sgd), which
    /// computes what Burn's `Sgd` does, in one in-place pass per parameter on the CPU.
    pub fn optimizer(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(crate::optim::Sgd {
            momentum: self.momentum,
            dampening: 0.0,
        })
    }

    /// Checks every field, naming the flag of the first bad one.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a zero epoch count or batch size, a learning rate that is
    /// not a positive finite number, or a momentum outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(TrainError::Config { field, reason });
        if self.epochs == 0 {
            return bad("--epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size", "must be at least 1".into());
        }
        if self.eval_batch_size == 0 {
            return bad("--eval-batch-size", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "--lr",
                format!("must be a positive number, got {}", self.lr),
            );
        }
        if let Some(group) = self
            .lr_groups
            .iter()
            .find(|g| !(g.lr.is_finite() && g.lr > 0.0))
        {
            return bad(
                "--lr",
                format!(
                    "the learning rate of {}* must be a positive number, got {}",
                    group.prefix, group.lr
                ),
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(
                "--momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_fields_are_named() {
        TrainerConfig::default().validate().unwrap();
        let cases = [
            (
                TrainerConfig {
                    epochs: 0,
                    ..Default::default()
                },
                "--epochs",
            ),
            (
                TrainerConfig {
                    batch_size: 0,
                    ..Default::default()
                },
                "--batch-size",
            ),
            (
                TrainerConfig {
                    lr: f64::NAN,
                    ..Default::default()
                },
                "--lr",
            ),
            (
                TrainerConfig {
                    lr: -1.0,
                    ..Default::default()
                },
                "--lr",
            ),
            (
                TrainerConfig {
                    momentum: 1.0,
                    ..Default::default()
                },
                "--momentum",
            ),
        ];
        for (config, field) in cases {
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
    }
}
