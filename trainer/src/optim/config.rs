//! [`OptimizerConfig`]: the optimizers the trainer runs, replicated or sharded.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use kiln_multi::FlatOptimizer;
use serde::{Deserialize, Serialize};

use super::sgd::Sgd;
use crate::error::{Result, TrainError};

/// An optimizer and its hyper-parameters (the learning rate comes from the trainer's
/// schedule). Every variant has the arithmetic of Burn's optimizer of the same name, so a
/// replicated run (Burn's `ModuleOptimizer`) and a ZeRO run ([`FlatOptimizer`] on shards)
/// take the same steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// SGD with momentum, as PyTorch's `SGD(lr, momentum, dampening, weight_decay, nesterov)`.
    /// Without Nesterov and weight decay it runs kiln's in-place kernel ([`Sgd`]).
    Sgd {
        /// Momentum factor, in `[0, 1)`.
        momentum: f64,
        /// Share of the gradient left out of the velocity.
        #[serde(default)]
        dampening: f64,
        /// Nesterov's look-ahead.
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f32,
    },
    /// Adam (weight decay as an L2 penalty on the gradient, as PyTorch's `Adam`).
    Adam {
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
        /// Added to the denominator.
        epsilon: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// AdamW (decoupled weight decay), as PyTorch's `AdamW`.
    AdamW {
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
        /// Added to the denominator.
        epsilon: f32,
        /// Decoupled weight decay per unit of learning rate.
        weight_decay: f32,
    },
}

impl Default for OptimizerConfig {
    /// SGD with momentum 0.9 (PyTorch's MNIST example).
    fn default() -> Self {
        Self::sgd(0.9)
    }
}

impl OptimizerConfig {
    /// SGD with `momentum`, no dampening, no Nesterov, no weight decay.
    pub const fn sgd(momentum: f64) -> Self {
        Self::Sgd {
            momentum,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// Adam with Burn's defaults: betas 0.9 and 0.999, epsilon 1e-5, no weight decay.
    pub const fn adam() -> Self {
        Self::Adam {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 0.0,
        }
    }

    /// AdamW with betas 0.9 and 0.999, epsilon 1e-8 and `weight_decay` (PyTorch's defaults
    /// but for the decay, which PyTorch sets to 0.01).
    pub const fn adamw(weight_decay: f32) -> Self {
        Self::AdamW {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay,
        }
    }

    /// The optimizer's name, as `--optimizer` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adam { .. } => "adam",
            Self::AdamW { .. } => "adamw",
        }
    }

    /// Adam's and AdamW's `(beta_1, beta_2, epsilon)`; `None` for SGD.
    fn adam_parameters(&self) -> Option<(f32, f32, f32)> {
        match *self {
            Self::Sgd { .. } => None,
            Self::Adam {
                beta_1,
                beta_2,
                epsilon,
                ..
            }
            | Self::AdamW {
                beta_1,
                beta_2,
                epsilon,
                ..
            } => Some((beta_1, beta_2, epsilon)),
        }
    }

    /// Burn's optimizer for a replicated run.
    pub fn build(&self) -> ModuleOptimizer {
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                nesterov: false,
                weight_decay: 0.0,
            } => ModuleOptimizer::from(Sgd {
                momentum,
                dampening,
            }),
            Self::Sgd {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => SgdConfig::new()
                .with_momentum(Some(MomentumConfig {
                    momentum,
                    dampening,
                    nesterov,
                }))
                .with_weight_decay(decay(weight_decay))
                .init(),
            Self::Adam {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => AdamConfig::new()
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_epsilon(epsilon)
                .with_weight_decay(decay(weight_decay))
                .init(),
            Self::AdamW {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => AdamWConfig::new()
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_epsilon(epsilon)
                .with_weight_decay(weight_decay)
                .init(),
        }
    }

    /// The same optimizer over flat shards, for ZeRO.
    pub fn flat(&self) -> FlatOptimizer {
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => FlatOptimizer::SgdMomentum {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            },
            Self::Adam {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => FlatOptimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            },
            Self::AdamW {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => FlatOptimizer::AdamW {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            },
        }
    }

    /// Checks the hyper-parameters, naming the flag of the first bad one.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a momentum outside `[0, 1)`, a beta outside `[0, 1)`, a
    /// non-positive epsilon or a negative weight decay.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(TrainError::Config { field, reason });
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let (weight_decay, betas) = match *self {
            Self::Sgd {
                momentum,
                dampening,
                weight_decay,
                ..
            } => {
                if !unit(momentum) {
                    return bad("--momentum", format!("must be in [0, 1), got {momentum}"));
                }
                if !(0.0..=1.0).contains(&dampening) {
                    return bad("--dampening", format!("must be in [0, 1], got {dampening}"));
                }
                (weight_decay, None)
            }
            Self::Adam { weight_decay, .. } | Self::AdamW { weight_decay, .. } => {
                (weight_decay, self.adam_parameters())
            }
        };
        if let Some((beta_1, beta_2, epsilon)) = betas {
            for (field, beta) in [("--beta1", beta_1), ("--beta2", beta_2)] {
                if !unit(f64::from(beta)) {
                    return bad(field, format!("must be in [0, 1), got {beta}"));
                }
            }
            if !(epsilon.is_finite() && epsilon > 0.0) {
                return bad("--epsilon", format!("must be positive, got {epsilon}"));
            }
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return bad(
                "--weight-decay",
                format!("must be zero or positive, got {weight_decay}"),
            );
        }
        Ok(())
    }
}

fn decay(weight_decay: f32) -> Option<WeightDecayConfig> {
    (weight_decay != 0.0).then_some(WeightDecayConfig {
        penalty: weight_decay,
    })
}

impl std::fmt::Display for OptimizerConfig {
    /// As the flags spell it: `adamw (--beta1 0.9 --beta2 0.999 --epsilon 1e-8
    /// --weight-decay 0.01)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => write!(
                f,
                "sgd (--momentum {momentum} --dampening {dampening} --nesterov {nesterov} \
                 --weight-decay {weight_decay})"
            ),
            Self::Adam { weight_decay, .. } | Self::AdamW { weight_decay, .. } => {
                let (beta_1, beta_2, epsilon) = self.adam_parameters().unwrap_or_default();
                write!(
                    f,
                    "{} (--beta1 {beta_1} --beta2 {beta_2} --epsilon {epsilon} --weight-decay \
                     {weight_decay})",
                    self.name()
                )
            }
        }
    }
}
