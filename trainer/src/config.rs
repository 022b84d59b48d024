use std::num::NonZeroUsize;

use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{LrSchedule, OptimizerConfig};

/// Hyper-parameters of a training run: an optimizer, its learning-rate schedule, clipping and
/// accumulation, over a shuffled data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Total epochs to train (a resumed run continues up to this number).
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Samples per forward pass during evaluation.
    pub eval_batch_size: usize,
    /// Base learning rate (the schedule's peak).
    pub lr: f64,
    /// The optimizer (default: SGD with momentum 0.9). Checkpoints from before this field
    /// held `momentum` alone, always 0.9: they read as the default.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// How the learning rate changes over the optimizer steps.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Clip the (synchronised) gradient to this global L2 norm before each step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// Batches whose gradients are averaged into one optimizer step (gradient accumulation);
    /// the effective batch is `batch_size * accumulation_steps`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub accumulation_steps: NonZeroUsize,
    /// Seed of the model initialisation and of the per-epoch shuffles.
    pub seed: u64,
    /// Parameters whose path starts with a group's prefix train with that group's learning
    /// rate instead of `lr` (PyTorch's parameter groups), e.g. a fine-tuned head; the first
    /// matching group wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_groups: Vec<LrGroup>,
    /// Also write a checkpoint every this many optimizer steps inside an epoch (the latest
    /// one is kept; each epoch's end is always checkpointed). May change on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<std::num::NonZeroU64>,
    /// Which epoch checkpoints stay (default: the last 5 and the best). May change on resume.
    #[serde(default)]
    pub retention: crate::checkpoint::Retention,
    /// Write checkpoints on the training thread, which waits for each, instead of on a
    /// background thread while training goes on (the default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_checkpoints: bool,
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
            optimizer: OptimizerConfig::default(),
            schedule: LrSchedule::Constant,
            clip_grad_norm: None,
            accumulation_steps: NonZeroUsize::MIN,
            seed: 42,
            lr_groups: Vec::new(),
            checkpoint_every: None,
            retention: crate::checkpoint::Retention::default(),
            sync_checkpoints: false,
        }
    }
}

impl TrainerConfig {
    /// The optimizer the trainer runs when replicated: [`OptimizerConfig::build`].
    pub fn build_optimizer(&self) -> ModuleOptimizer {
        self.optimizer.build()
    }

    /// Checks every field, naming the flag of the first bad one.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a zero epoch count or batch size, a learning rate that is
    /// not a positive finite number, a bad optimizer hyper-parameter or schedule, or a
    /// clipping norm that is not positive.
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
        if let Some(norm) = self.clip_grad_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            return bad("--clip-grad-norm", format!("must be positive, got {norm}"));
        }
        self.optimizer.validate()?;
        self.schedule.validate(self.lr)
    }
}

fn one() -> NonZeroUsize {
    NonZeroUsize::MIN
}

fn is_one(n: &NonZeroUsize) -> bool {
    n.get() == 1
}

impl TrainerConfig {
    /// The settings of `self` (a checkpoint's) that `now` changes, epochs aside, each as
    /// `--flag OLD (now NEW)`; empty when a run with `now` may resume one with `self`.
    pub fn differences(&self, now: &TrainerConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |flag: &str, old: String, new: String| {
            if old != new {
                out.push(format!("{flag} {old} (now {new})"));
            }
        };
        check(
            "--batch-size",
            self.batch_size.to_string(),
            now.batch_size.to_string(),
        );
        check(
            "--eval-batch-size",
            self.eval_batch_size.to_string(),
            now.eval_batch_size.to_string(),
        );
        check("--lr", self.lr.to_string(), now.lr.to_string());
        check(
            "--optimizer",
            self.optimizer.to_string(),
            now.optimizer.to_string(),
        );
        check(
            "--lr-schedule",
            self.schedule.to_string(),
            now.schedule.to_string(),
        );
        let clip = |c: Option<f64>| c.map_or("none".to_string(), |c| c.to_string());
        check(
            "--clip-grad-norm",
            clip(self.clip_grad_norm),
            clip(now.clip_grad_norm),
        );
        check(
            "--accumulation-steps",
            self.accumulation_steps.to_string(),
            now.accumulation_steps.to_string(),
        );
        check("--seed", self.seed.to_string(), now.seed.to_string());
        let groups = |g: &[LrGroup]| {
            let rates: Vec<String> = g
                .iter()
                .map(|g| format!("{}*: {}", g.prefix, g.lr))
                .collect();
            format!("[{}]", rates.join(", "))
        };
        check(
            "--backbone-lr (parameter-group rates)",
            groups(&self.lr_groups),
            groups(&now.lr_groups),
        );
        out
    }

    /// Samples per optimizer step (over all ranks): `batch_size * accumulation_steps`.
    pub fn effective_batch(&self) -> usize {
        self.batch_size * self.accumulation_steps.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_flags_that_changed() {
        let old = TrainerConfig::default();
        let now = TrainerConfig {
            epochs: 9,
            lr: 0.02,
            clip_grad_norm: Some(1.0),
            ..TrainerConfig::default()
        };
        assert_eq!(
            old.differences(&now),
            ["--lr 0.01 (now 0.02)", "--clip-grad-norm none (now 1)"]
        );
        assert!(
            old.differences(&TrainerConfig {
                epochs: 1,
                ..old.clone()
            })
            .is_empty()
        );
    }

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
                    optimizer: OptimizerConfig::sgd(1.0),
                    ..Default::default()
                },
                "--momentum",
            ),
            (
                TrainerConfig {
                    clip_grad_norm: Some(0.0),
                    ..Default::default()
                },
                "--clip-grad-norm",
            ),
            (
                TrainerConfig {
                    optimizer: OptimizerConfig::adamw(-1.0),
                    ..Default::default()
                },
                "--weight-decay",
            ),
        ];
        for (config, field) in cases {
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
    }
}
