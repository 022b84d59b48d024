//! Optimizers over flat `f32` slices, with the arithmetic of Burn's `Sgd`, `Adam` and `AdamW`,
//! so that a sharded step equals Burn's step on one device.

/// An optimizer that [`ZeroOptimizer`](super::ZeroOptimizer) runs on its shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FlatOptimizer {
    /// SGD with momentum, as Burn's `SgdConfig` with a momentum and optionally a weight decay:
    /// `g += weight_decay * p`; `v = g` at a parameter's first step, then `v = momentum * v +
    /// (1 - dampening) * g`; `p -= lr * v`, or with Nesterov `p -= lr * (momentum * v + g)`.
    SgdMomentum {
        /// Momentum factor.
        momentum: f64,
        /// Dampening of the gradient in the velocity.
        dampening: f64,
        /// Nesterov's look-ahead.
        nesterov: bool,
        /// L2 penalty added to the gradient (0: none).
        weight_decay: f32,
    },
    /// Adam, as Burn's `AdamConfig` (no AMSGrad; weight decay as an L2 penalty on the
    /// gradient): bias-corrected moments,
    /// `p -= lr * m1 * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(m2) + eps * sqrt(1 - b2^t))`.
    Adam {
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
        /// Added to the denominator.
        epsilon: f32,
        /// L2 penalty added to the gradient (0: none).
        weight_decay: f32,
    },
    /// AdamW, as Burn's `AdamWConfig` (no AMSGrad, no cautious decay): decoupled weight decay
    /// `p *= 1 - lr * weight_decay`, then `p -= lr * m1_hat / (sqrt(m2_hat) + eps)`.
    AdamW {
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
        /// Added to the denominator.
        epsilon: f32,
        /// Decoupled weight decay.
        weight_decay: f32,
    },
}

impl FlatOptimizer {
    /// Burn's default Adam: betas 0.9 and 0.999, epsilon 1e-5, no weight decay.
    pub const ADAM: FlatOptimizer = FlatOptimizer::Adam {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-5,
        weight_decay: 0.0,
    };

    /// SGD with `momentum`, no dampening, no Nesterov, no weight decay (PyTorch's
    /// `SGD(lr, momentum)`).
    pub const fn sgd_momentum(momentum: f64) -> FlatOptimizer {
        FlatOptimizer::SgdMomentum {
            momentum,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// `f32` state values kept per parameter element: 1 for SGD momentum, 2 for Adam(W).
    pub fn state_per_element(self) -> usize {
        match self {
            FlatOptimizer::SgdMomentum { .. } => 1,
            FlatOptimizer::Adam { .. } | FlatOptimizer::AdamW { .. } => 2,
        }
    }

    /// A short name for reports and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            FlatOptimizer::SgdMomentum { .. } => "sgd-momentum",
            FlatOptimizer::Adam { .. } => "adam",
            FlatOptimizer::AdamW { .. } => "adamw",
        }
    }

    /// One step of one parameter's elements: `params`, `grads` and the state slices have the
    /// same length; `first` is the parameter's first step, `time` its step count (1-based)
    /// after this step; every gradient is multiplied by `grad_scale` first (gradient clipping).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        self,
        lr: f64,
        params: &mut [f32],
        grads: &[f32],
        state: (&mut [f32], &mut [f32]),
        first: bool,
        time: i32,
        grad_scale: Option<f32>,
    ) {
        let scaled: Vec<f32>;
        let grads = match grad_scale {
            Some(s) => {
                scaled = grads.iter().map(|g| g * s).collect();
                &scaled[..]
            }
            None => grads,
        };
        match self {
            FlatOptimizer::SgdMomentum {
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => sgd(
                lr as f32,
                params,
                grads,
                state.0,
                first,
                (momentum as f32, (1.0 - dampening) as f32, nesterov),
                weight_decay,
            ),
            FlatOptimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => {
                let lr = lr as f32;
                let bias2_sqrt = (1.0 - beta_2.powi(time)).sqrt();
                let factor = bias2_sqrt / (1.0 - beta_1.powi(time));
                let eps = epsilon * bias2_sqrt;
                let (m1, m2) = state;
                for (((p, &g), a), b) in params.iter_mut().zip(grads).zip(m1).zip(m2) {
                    let g = if weight_decay != 0.0 {
                        *p * weight_decay + g
                    } else {
                        g
                    };
                    update_moments(a, b, g, first, beta_1, beta_2);
                    *p -= *a * factor / (b.sqrt() + eps) * lr;
                }
            }
            FlatOptimizer::AdamW {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            } => {
                let decay = lr * f64::from(weight_decay);
                let keep = (1.0 - decay) as f32;
                let (bias1, bias2) = (1.0 - beta_1.powi(time), 1.0 - beta_2.powi(time));
                let (m1, m2) = state;
                for (((p, &g), a), b) in params.iter_mut().zip(grads).zip(m1).zip(m2) {
                    update_moments(a, b, g, first, beta_1, beta_2);
                    let delta = (*a / bias1) / ((*b / bias2).sqrt() + epsilon);
                    let decayed = if decay == 0.0 { *p } else { *p * keep };
                    *p = decayed - delta * lr as f32;
                }
            }
        }
    }
}

/// Burn's `Sgd` on a slice: weight decay, momentum (with dampening and Nesterov), update.
fn sgd(
    lr: f32,
    params: &mut [f32],
    grads: &[f32],
    velocity: &mut [f32],
    first: bool,
    (momentum, keep, nesterov): (f32, f32, bool),
    weight_decay: f32,
) {
    for ((p, &g), v) in params.iter_mut().zip(grads).zip(velocity.iter_mut()) {
        let g = if weight_decay != 0.0 {
            *p * weight_decay + g
        } else {
            g
        };
        *v = if first { g } else { g * keep + *v * momentum };
        let step = if nesterov { *v * momentum + g } else { *v };
        *p -= step * lr;
    }
}

/// Adam's moment updates, as Burn writes them (the first step starts from zero moments).
fn update_moments(a: &mut f32, b: &mut f32, g: f32, first: bool, beta_1: f32, beta_2: f32) {
    if first {
        *a = g * (1.0 - beta_1);
        *b = g * g * (1.0 - beta_2);
    } else {
        *a = *a * beta_1 + g * (1.0 - beta_1);
        *b = *b * beta_2 + g * g * (1.0 - beta_2);
    }
}
