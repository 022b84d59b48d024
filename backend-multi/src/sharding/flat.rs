//! Optimizers over flat `f32` slices, with the arithmetic of Burn's `Sgd` (momentum) and
//! `Adam`, so that a sharded step equals Burn's step on one device.

/// An optimizer that [`ZeroOptimizer`](super::ZeroOptimizer) runs on its shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FlatOptimizer {
    /// SGD with momentum, as Burn's `SgdConfig::new().with_momentum(..)` (no weight decay,
    /// not Nesterov): `v = g` at a parameter's first step, then `v = momentum * v +
    /// (1 - dampening) * g`; `p -= lr * v`.
    SgdMomentum {
        /// Momentum factor.
        momentum: f64,
        /// Dampening of the gradient in the velocity.
        dampening: f64,
    },
    /// Adam, as Burn's `AdamConfig` (no weight decay, no AMSGrad): bias-corrected moments,
    /// `p -= lr * m1 * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(m2) + eps * sqrt(1 - b2^t))`.
    Adam {
        /// Decay of the first moment.
        beta_1: f32,
        /// Decay of the second moment.
        beta_2: f32,
        /// Added to the denominator.
        epsilon: f32,
    },
}

impl FlatOptimizer {
    /// Burn's default Adam: betas 0.9 and 0.999, epsilon 1e-5.
    pub const ADAM: FlatOptimizer = FlatOptimizer::Adam {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-5,
    };

    /// `f32` state values kept per parameter element: 1 for SGD momentum, 2 for Adam.
    pub fn state_per_element(self) -> usize {
        match self {
            FlatOptimizer::SgdMomentum { .. } => 1,
            FlatOptimizer::Adam { .. } => 2,
        }
    }

    /// A short name for reports and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            FlatOptimizer::SgdMomentum { .. } => "sgd-momentum",
            FlatOptimizer::Adam { .. } => "adam",
        }
    }

    /// One step of one parameter's elements: `params`, `grads` and the state slices have the
    /// same length; `first` is the parameter's first step, `time` its step count (1-based)
    /// after this step.
    pub(crate) fn step(
        self,
        lr: f64,
        params: &mut [f32],
        grads: &[f32],
        state: (&mut [f32], &mut [f32]),
        first: bool,
        time: i32,
    ) {
        let lr = lr as f32;
        match self {
            FlatOptimizer::SgdMomentum {
                momentum,
                dampening,
            } => {
                let (m, keep) = (momentum as f32, (1.0 - dampening) as f32);
                for ((p, &g), v) in params.iter_mut().zip(grads).zip(state.0.iter_mut()) {
                    *v = if first { g } else { g * keep + *v * m };
                    *p -= *v * lr;
                }
            }
            FlatOptimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
            } => {
                let bias2_sqrt = (1.0 - beta_2.powi(time)).sqrt();
                let factor = bias2_sqrt / (1.0 - beta_1.powi(time));
                let eps = epsilon * bias2_sqrt;
                let (m1, m2) = state;
                for (((p, &g), a), b) in params.iter_mut().zip(grads).zip(m1).zip(m2) {
                    if first {
                        *a = g * (1.0 - beta_1);
                        *b = g * g * (1.0 - beta_2);
                    } else {
                        *a = *a * beta_1 + g * (1.0 - beta_1);
                        *b = *b * beta_2 + g * g * (1.0 - beta_2);
                    }
                    *p -= *a * factor / (b.sqrt() + eps) * lr;
                }
            }
        }
    }
}
