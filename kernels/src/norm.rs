//! Batch normalisation in training mode on contiguous `f32` NCHW slices: batch statistics,
//! normalisation and its backward, each one or two passes over the activations.
//!
//! Burn's generic `batch_norm_train` (what Flex runs) builds the statistics and the gradient out
//! of tensor ops: each swaps the batch and channel dimensions (a copy of the whole tensor),
//! reduces, broadcasts and subtracts, about a dozen passes and as many fresh buffers per layer.
//! Here the statistics are two reads of each channel, the forward one read and one write, the
//! backward two reads and one write, in parallel over channels.

use rayon::prelude::*;

/// The layout of a batch-norm input: `[batch, channels, plane]` (`plane` = height x width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Samples.
    pub batch: usize,
    /// Channels (one mean, variance, gamma and beta each).
    pub channels: usize,
    /// Elements per channel and sample.
    pub plane: usize,
}

impl NormShape {
    /// Elements of the whole input.
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Whether the input has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel over the batch.
    fn count(&self) -> usize {
        self.batch * self.plane
    }

    /// The planes of channel `c`, one per sample.
    fn planes<'a>(&self, x: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |n| &x[(n * channels + c) * plane..][..plane])
    }

    fn check(&self, len: usize, what: &str) {
        assert_eq!(len, self.len(), "{what} length");
    }
}

/// Sum of `f(v)` over a plane, in eight `f32` lanes (vectorised) and then `f64`.
fn plane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
}

/// Per-channel mean and biased variance of `x` (what a training batch norm normalises with and
/// feeds its running statistics), two passes (mean, then squared deviations).
pub fn batch_norm_stats(s: &NormShape, x: &[f32], mean: &mut [f32], var: &mut [f32]) {
    s.check(x.len(), "input");
    assert_eq!(mean.len(), s.channels, "mean length");
    assert_eq!(var.len(), s.channels, "variance length");
    let count = s.count() as f64;
    mean.par_iter_mut()
        .zip(var.par_iter_mut())
        .enumerate()
        .for_each(|(c, (m, v))| {
            let mu = s.planes(x, c).map(|p| plane_sum(p, |x| x)).sum::<f64>() / count;
            let mu32 = mu as f32;
            let sq = s
                .planes(x, c)
                .map(|p| {
                    plane_sum(p, |x| {
                        let d = x - mu32;
                        d * d
                    })
                })
                .sum::<f64>();
            *m = mu32;
            *v = (sq / count) as f32;
        });
}

/// `1 / sqrt(var + epsilon)` per channel.
fn inv_std(var: &[f32], epsilon: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + epsilon).sqrt()) as f32)
        .collect()
}

/// `out = (x - mean) / sqrt(var + epsilon) * gamma + beta`, per channel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    out: &mut [f32],
) {
    s.check(x.len(), "input");
    s.check(out.len(), "output");
    for v in [mean, var, gamma, beta] {
        assert_eq!(v.len(), s.channels, "per-channel length");
    }
    let inv = inv_std(var, epsilon);
    out.par_chunks_mut(s.plane)
        .zip(x.par_chunks(s.plane))
        .enumerate()
        .for_each(|(i, (o, x))| {
            let c = i % s.channels;
            let scale = gamma[c] * inv[c];
            let shift = beta[c] - mean[c] * scale;
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x * scale + shift;
            }
        });
}

/// Gradients of [`batch_norm_forward`] with the batch statistics of `x` (their dependence on
/// `x` included): `grad_x`, and per channel `grad_gamma = sum(dy * x_hat)` and
/// `grad_beta = sum(dy)`, where `x_hat = (x - mean) / sqrt(var + epsilon)` and
/// `grad_x = gamma / sqrt(var + epsilon) * (dy - mean(dy) - x_hat * mean(dy * x_hat))`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    epsilon: f64,
    grad_out: &[f32],
    grad_x: &mut [f32],
    grad_gamma: &mut [f32],
    grad_beta: &mut [f32],
) {
    s.check(x.len(), "input");
    s.check(grad_out.len(), "output gradient");
    s.check(grad_x.len(), "input gradient");
    for v in [mean, var, gamma] {
        assert_eq!(v.len(), s.channels, "per-channel length");
    }
    assert_eq!(grad_gamma.len(), s.channels, "gamma gradient length");
    assert_eq!(grad_beta.len(), s.channels, "beta gradient length");
    let inv = inv_std(var, epsilon);
    // sum(dy) and sum(dy * (x - mean)) per channel.
    grad_beta
        .par_iter_mut()
        .zip(grad_gamma.par_iter_mut())
        .enumerate()
        .for_each(|(c, (gb, gg))| {
            let mu = mean[c];
            let (mut sum, mut dot) = (0.0f64, 0.0f64);
            for (x, dy) in s.planes(x, c).zip(s.planes(grad_out, c)) {
                let mut lanes = [[0.0f32; 8]; 2];
                let xs = x.chunks_exact(8);
                let dys = dy.chunks_exact(8);
                for (&x, &dy) in xs.remainder().iter().zip(dys.remainder()) {
                    sum += dy as f64;
                    dot += (dy * (x - mu)) as f64;
                }
                for (x, dy) in xs.zip(dys) {
                    for l in 0..8 {
                        lanes[0][l] += dy[l];
                        lanes[1][l] += dy[l] * (x[l] - mu);
                    }
                }
                sum += lanes[0].iter().map(|&v| v as f64).sum::<f64>();
                dot += lanes[1].iter().map(|&v| v as f64).sum::<f64>();
            }
            *gb = sum as f32;
            *gg = (dot * inv[c] as f64) as f32;
        });
    let count = s.count() as f32;
    grad_x
        .par_chunks_mut(s.plane)
        .zip(x.par_chunks(s.plane).zip(grad_out.par_chunks(s.plane)))
        .enumerate()
        .for_each(|(i, (dx, (x, dy)))| {
            let c = i % s.channels;
            let scale = gamma[c] * inv[c];
            let mean_dy = grad_beta[c] / count;
            // x_hat * mean(dy * x_hat) = (x - mean) * inv^2 * grad_gamma / inv / count.
            let k = inv[c] * grad_gamma[c] / count;
            let mu = mean[c];
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx = scale * (dy - mean_dy - (x - mu) * k);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    /// The loss `L = sum(out * w)` for fixed weights `w`, in `f64` from the definition.
    fn loss(s: &NormShape, x: &[f64], gamma: &[f64], beta: &[f64], w: &[f32], eps: f64) -> f64 {
        let count = s.count() as f64;
        let mut total = 0.0;
        for c in 0..s.channels {
            let idx = |n: usize, p: usize| (n * s.channels + c) * s.plane + p;
            let all = || (0..s.batch).flat_map(move |n| (0..s.plane).map(move |p| idx(n, p)));
            let mu = all().map(|i| x[i]).sum::<f64>() / count;
            let var = all().map(|i| (x[i] - mu).powi(2)).sum::<f64>() / count;
            for i in all() {
                let y = (x[i] - mu) / (var + eps).sqrt() * gamma[c] + beta[c];
                total += y * w[i] as f64;
            }
        }
        total
    }

    #[test]
    fn statistics_forward_and_gradients_match_the_definition() {
        let eps = 1e-5;
        for (i, s) in [
            NormShape {
                batch: 2,
                channels: 3,
                plane: 5,
            },
            NormShape {
                batch: 1,
                channels: 2,
                plane: 17,
            },
            NormShape {
                batch: 4,
                channels: 5,
                plane: 1,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 * i as u32;
            let x: Vec<f32> = values(s.len(), seed)
                .iter()
                .map(|v| 3.0 * v + 0.5)
                .collect();
            let gamma = values(s.channels, seed + 1);
            let beta = values(s.channels, seed + 2);
            let w = values(s.len(), seed + 3);
            let (mut mean, mut var) = (vec![0.0; s.channels], vec![0.0; s.channels]);
            batch_norm_stats(&s, &x, &mut mean, &mut var);
            for c in 0..s.channels {
                let vals: Vec<f64> = s.planes(&x, c).flatten().map(|&v| v as f64).collect();
                let mu = vals.iter().sum::<f64>() / vals.len() as f64;
                let v = vals.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / vals.len() as f64;
                assert!((mean[c] as f64 - mu).abs() < 1e-5, "{s:?} mean");
                assert!((var[c] as f64 - v).abs() < 1e-5 * v.max(1.0), "{s:?} var");
            }
            let mut out = vec![0.0; s.len()];
            batch_norm_forward(&s, &x, &mean, &var, &gamma, &beta, eps, &mut out);
            let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
            let want: f64 = loss(&s, &x64, &g64, &b64, &w, eps);
            let got: f64 = out.iter().zip(&w).map(|(o, w)| (o * w) as f64).sum();
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{s:?} forward"
            );

            let (mut dx, mut dg, mut db) = (
                vec![0.0; s.len()],
                vec![0.0; s.channels],
                vec![0.0; s.channels],
            );
            batch_norm_backward(
                &s, &x, &mean, &var, &gamma, eps, &w, &mut dx, &mut dg, &mut db,
            );
            // Central differences of the f64 loss.
            let h = 1e-4;
            let numeric = |k: usize, which: u8| {
                let bump = |d: f64| {
                    let (mut x, mut g, mut b) = (x64.clone(), g64.clone(), b64.clone());
                    match which {
                        0 => x[k] += d,
                        1 => g[k] += d,
                        _ => b[k] += d,
                    }
                    loss(&s, &x, &g, &b, &w, eps)
                };
                (bump(h) - bump(-h)) / (2.0 * h)
            };
            for (k, &d) in dx.iter().enumerate() {
                let n = numeric(k, 0);
                assert!(
                    (d as f64 - n).abs() < 1e-3 * n.abs().max(1.0),
                    "{s:?} dx[{k}]: {d} vs {n}"
                );
            }
            for c in 0..s.channels {
                let n = numeric(c, 1);
                assert!(
                    (dg[c] as f64 - n).abs() < 1e-3 * n.abs().max(1.0),
                    "{s:?} dgamma"
                );
                let n = numeric(c, 2);
                assert!(
                    (db[c] as f64 - n).abs() < 1e-3 * n.abs().max(1.0),
                    "{s:?} dbeta"
                );
            }
        }
    }
}
