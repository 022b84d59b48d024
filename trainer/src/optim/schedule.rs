//! [`LrSchedule`]: the learning rate of every optimizer step.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How the learning rate changes over the optimizer steps of a run.
///
/// A schedule is a pure function of the step count, not a stateful scheduler (as Burn's
/// `LrScheduler`s are): a resumed run restores its position from the checkpoint's step count
/// alone, and every rank computes the same rate without exchanging state.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// The base rate times `gamma` after every `every` steps (PyTorch's `StepLR`).
    Step {
        /// Steps between decays.
        every: u64,
        /// Factor per decay, in `(0, 1]`.
        gamma: f64,
    },
    /// A linear warm-up to the base rate over `warmup_steps`, then a half cosine down to
    /// `min_lr` at `total_steps`, and `min_lr` after (nanoGPT's schedule).
    WarmupCosine {
        /// Steps of the linear warm-up (0: none); step `s < warmup_steps` runs at
        /// `lr * (s + 1) / warmup_steps`.
        warmup_steps: u64,
        /// The step at which the cosine reaches `min_lr`.
        total_steps: u64,
        /// The final rate.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The rate of optimizer step `step` (0 for the first step of a run) for base rate `lr`.
    pub fn lr(&self, lr: f64, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant => lr,
            LrSchedule::Step { every, gamma } => {
                let decays = i32::try_from(step / every.max(1)).unwrap_or(i32::MAX);
                lr * gamma.powi(decays)
            }
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    return lr * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
            }
        }
    }

    /// Checks the schedule against base rate `lr`, naming the flag of the first bad value.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a zero step interval, a decay factor outside `(0, 1]`, a
    /// warm-up longer than the schedule, or a final rate outside `[0, lr]`.
    pub fn validate(&self, lr: f64) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(TrainError::Config { field, reason });
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Step { every, gamma } => {
                if every == 0 {
                    return bad("--lr-step-every", "must be at least 1".into());
                }
                if !(gamma > 0.0 && gamma <= 1.0) {
                    return bad("--lr-gamma", format!("must be in (0, 1], got {gamma}"));
                }
                Ok(())
            }
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr,
            } => {
                if total_steps == 0 || warmup_steps > total_steps {
                    return bad(
                        "--warmup-steps",
                        format!(
                            "{warmup_steps} warm-up steps do not fit a schedule of \
                             {total_steps} steps"
                        ),
                    );
                }
                if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
                    return bad("--min-lr", format!("must be in [0, {lr}], got {min_lr}"));
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Display for LrSchedule {
    /// In words and flags: `warm-up cosine (--warmup-steps 20, to --min-lr 0.0003 at step
    /// 192)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            LrSchedule::Constant => write!(f, "constant"),
            LrSchedule::Step { every, gamma } => {
                write!(f, "step (--lr-step-every {every} --lr-gamma {gamma})")
            }
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr,
            } => write!(
                f,
                "warm-up cosine (--warmup-steps {warmup_steps}, to --min-lr {min_lr} at step \
                 {total_steps})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_follows_its_closed_form() {
        let schedule = LrSchedule::WarmupCosine {
            warmup_steps: 4,
            total_steps: 14,
            min_lr: 0.1,
        };
        let lrs: Vec<f64> = (0..16).map(|s| schedule.lr(1.0, s)).collect();
        let expected = |s: u64| match s {
            0..4 => (s + 1) as f64 / 4.0,
            _ => {
                let p = ((s - 4) as f64 / 10.0).min(1.0);
                0.1 + 0.45 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        };
        for (s, lr) in lrs.iter().enumerate() {
            let want = expected(s as u64);
            assert!((lr - want).abs() < 1e-12, "step {s}: {lr} vs {want}");
        }
        assert_eq!(lrs[3], 1.0, "the warm-up ends at the base rate");
        assert!((lrs[9] - 0.55).abs() < 1e-12, "half way down the cosine");
        assert_eq!(lrs[14], 0.1);
        assert_eq!(lrs[15], 0.1, "flat after the end");
    }

    #[test]
    fn step_decay_and_validation() {
        let schedule = LrSchedule::Step {
            every: 3,
            gamma: 0.5,
        };
        let lrs: Vec<f64> = (0..7).map(|s| schedule.lr(0.8, s)).collect();
        assert_eq!(lrs, [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]);
        let cases = [
            (
                LrSchedule::Step {
                    every: 0,
                    gamma: 0.5,
                },
                "--lr-step-every",
            ),
            (
                LrSchedule::Step {
                    every: 1,
                    gamma: 1.5,
                },
                "--lr-gamma",
            ),
            (
                LrSchedule::WarmupCosine {
                    warmup_steps: 5,
                    total_steps: 4,
                    min_lr: 0.0,
                },
                "--warmup-steps",
            ),
            (
                LrSchedule::WarmupCosine {
                    warmup_steps: 0,
                    total_steps: 4,
                    min_lr: f64::NAN,
                },
                "--min-lr",
            ),
        ];
        for (schedule, flag) in cases {
            let message = schedule.validate(0.1).unwrap_err().to_string();
            assert!(message.contains(flag), "{message}");
        }
    }
}
