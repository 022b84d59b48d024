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

/// ReLU as Burn's Flex computes it: NaN passes through.
#[inline]
fn relu(v: f32) -> f32 {
    if v.is_nan() || v > 0.0 { v } else { 0.0 }
}

/// `out = (x - mean) / sqrt(var + epsilon) * gamma + beta`, per channel; then, in the same
/// pass, `+ residual` when one is given and `max(., 0)` when `relu` (ResNet's
/// `relu(bn(conv(x)) + shortcut)` without the separate add and ReLU passes).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    residual: Option<&[f32]>,
    relu_after: bool,
    out: &mut [f32],
) {
    s.check(x.len(), "input");
    s.check(out.len(), "output");
    if let Some(r) = residual {
        s.check(r.len(), "residual");
    }
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
            match residual.map(|r| &r[i * s.plane..][..s.plane]) {
                Some(r) => {
                    for ((o, &x), &r) in o.iter_mut().zip(x).zip(r) {
                        *o = x * scale + shift + r;
                    }
                }
                None => {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = x * scale + shift;
                    }
                }
            }
            if relu_after {
                for o in o.iter_mut() {
                    *o = relu(*o);
                }
            }
        });
}

/// Gradients of [`batch_norm_forward`] with the batch statistics of `x` (their dependence on
/// `x` included): `grad_x`, and per channel `grad_gamma = sum(dy * x_hat)` and
/// `grad_beta = sum(dy)`, where `x_hat = (x - mean) / sqrt(var + epsilon)` and
/// `grad_x = gamma / sqrt(var + epsilon) * (dy - mean(dy) - x_hat * mean(dy * x_hat))`.
///
/// `grad_out` is the gradient of the forward's output. With a ReLU after the normalisation,
/// `relu_out` is that output: `grad_out` is first zeroed in place where it was not positive, and
/// so holds, on return, the gradient of the pre-ReLU sum, which is also the residual's gradient.
/// Without `grad_x` (`None`), the input gradient is written over `grad_out` instead (when
/// nothing else needs it: no residual).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    epsilon: f64,
    grad_out: &mut [f32],
    relu_out: Option<&[f32]>,
    grad_x: Option<&mut [f32]>,
    grad_gamma: &mut [f32],
    grad_beta: &mut [f32],
) {
    s.check(x.len(), "input");
    s.check(grad_out.len(), "output gradient");
    if let Some(dx) = &grad_x {
        s.check(dx.len(), "input gradient");
    }
    if let Some(y) = relu_out {
        s.check(y.len(), "output");
    }
    for v in [mean, var, gamma] {
        assert_eq!(v.len(), s.channels, "per-channel length");
    }
    assert_eq!(grad_gamma.len(), s.channels, "gamma gradient length");
    assert_eq!(grad_beta.len(), s.channels, "beta gradient length");
    let inv = inv_std(var, epsilon);
    // Per plane: the ReLU mask applied, then sum(dy) and sum(dy * (x - mean)).
    let plane = s.plane;
    let sums: Vec<(f64, f64)> = grad_out
        .par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .map(|(i, (dy, x))| {
            if let Some(y) = relu_out {
                for (d, &y) in dy.iter_mut().zip(&y[i * plane..][..plane]) {
                    if !(y.is_nan() || y > 0.0) {
                        *d = 0.0;
                    }
                }
            }
            let mu = mean[i % s.channels];
            let (mut sum, mut dot) = (0.0f64, 0.0f64);
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
            (sum, dot)
        })
        .collect();
    for c in 0..s.channels {
        let (sum, dot) = (0..s.batch)
            .map(|n| sums[n * s.channels + c])
            .fold((0.0, 0.0), |(a, b), (s, d)| (a + s, b + d));
        grad_beta[c] = sum as f32;
        grad_gamma[c] = (dot * inv[c] as f64) as f32;
    }
    let count = s.count() as f32;
    // dx = scale * (dy - mean(dy) - (x - mean) * k) with, per channel, scale = gamma * inv and
    // k = inv * grad_gamma / count (x_hat * mean(dy * x_hat) = (x - mean) * inv^2 *
    // grad_gamma / inv / count).
    let coefficients = |i: usize| {
        let c = i % s.channels;
        let k = inv[c] * grad_gamma[c] / count;
        (gamma[c] * inv[c], grad_beta[c] / count, k, mean[c])
    };
    match grad_x {
        Some(grad_x) => grad_x
            .par_chunks_mut(plane)
            .zip(x.par_chunks(plane).zip(grad_out.par_chunks(plane)))
            .enumerate()
            .for_each(|(i, (dx, (x, dy)))| {
                let (scale, mean_dy, k, mu) = coefficients(i);
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    *dx = scale * (dy - mean_dy - (x - mu) * k);
                }
            }),
        None => grad_out
            .par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (d, x))| {
                let (scale, mean_dy, k, mu) = coefficients(i);
                for (d, &x) in d.iter_mut().zip(x) {
                    *d = scale * (*d - mean_dy - (x - mu) * k);
                }
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    /// The loss `L = sum(out * w)` for fixed weights `w`, in `f64` from the definition, where
    /// `out = bn(x) (+ residual) (then ReLU)`.
    #[allow(clippy::too_many_arguments)]
    fn loss(
        s: &NormShape,
        x: &[f64],
        gamma: &[f64],
        beta: &[f64],
        residual: Option<&[f64]>,
        relu_after: bool,
        w: &[f32],
        eps: f64,
    ) -> f64 {
        let count = s.count() as f64;
        let mut total = 0.0;
        for c in 0..s.channels {
            let idx = |n: usize, p: usize| (n * s.channels + c) * s.plane + p;
            let all = || (0..s.batch).flat_map(move |n| (0..s.plane).map(move |p| idx(n, p)));
            let mu = all().map(|i| x[i]).sum::<f64>() / count;
            let var = all().map(|i| (x[i] - mu).powi(2)).sum::<f64>() / count;
            for i in all() {
                let mut y = (x[i] - mu) / (var + eps).sqrt() * gamma[c] + beta[c];
                if let Some(r) = residual {
                    y += r[i];
                }
                if relu_after {
                    y = y.max(0.0);
                }
                total += y * w[i] as f64;
            }
        }
        total
    }

    #[test]
    fn statistics_forward_and_gradients_match_the_definition() {
        let eps = 1e-5;
        let shapes = [
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
            NormShape {
                batch: 3,
                channels: 2,
                plane: 11,
            },
        ];
        // (shape, with a residual, with a ReLU): the plain batch norm, ResNet's bn + ReLU and
        // its relu(bn + shortcut).
        let cases = [
            (0, false, false),
            (1, false, false),
            (2, false, false),
            (0, false, true),
            (3, true, true),
            (1, true, false),
        ];
        for (i, &(shape, with_residual, relu_after)) in cases.iter().enumerate() {
            let s = shapes[shape];
            let seed = 10 * i as u32;
            let x: Vec<f32> = values(s.len(), seed)
                .iter()
                .map(|v| 3.0 * v + 0.5)
                .collect();
            let gamma = values(s.channels, seed + 1);
            let beta = values(s.channels, seed + 2);
            let w = values(s.len(), seed + 3);
            let residual = with_residual.then(|| values(s.len(), seed + 4));
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
            batch_norm_forward(
                &s,
                &x,
                &mean,
                &var,
                &gamma,
                &beta,
                eps,
                residual.as_deref(),
                relu_after,
                &mut out,
            );
            let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
            let r64 = residual.as_deref().map(f64s);
            let case = format!("{s:?}, residual {with_residual}, relu {relu_after}");
            let want = loss(&s, &x64, &g64, &b64, r64.as_deref(), relu_after, &w, eps);
            let got: f64 = out.iter().zip(&w).map(|(o, w)| (o * w) as f64).sum();
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{case}: forward"
            );
            if relu_after {
                assert!(out.iter().all(|&o| o >= 0.0), "{case}: ReLU");
                assert!(out.contains(&0.0), "{case}: the ReLU cuts something");
            }

            let (mut dx, mut dg, mut db) = (
                vec![0.0; s.len()],
                vec![0.0; s.channels],
                vec![0.0; s.channels],
            );
            let mut dy = w.clone();
            let relu_out = relu_after.then_some(&out[..]);
            batch_norm_backward(
                &s,
                &x,
                &mean,
                &var,
                &gamma,
                eps,
                &mut dy,
                relu_out,
                Some(&mut dx),
                &mut dg,
                &mut db,
            );
            // In place (no residual to keep the masked gradient for): the same values.
            let mut in_place = w.clone();
            let (mut dg2, mut db2) = (vec![0.0; s.channels], vec![0.0; s.channels]);
            batch_norm_backward(
                &s,
                &x,
                &mean,
                &var,
                &gamma,
                eps,
                &mut in_place,
                relu_out,
                None,
                &mut dg2,
                &mut db2,
            );
            assert_eq!(in_place, dx, "{case}: input gradient in place");
            assert_eq!((dg2, db2), (dg.clone(), db.clone()), "{case}: in place");
            // Central differences of the f64 loss; `which`: 0 x, 1 gamma, 2 beta, 3 residual.
            let h = 1e-4;
            let numeric = |k: usize, which: u8| {
                let bump = |d: f64| {
                    let (mut x, mut g, mut b) = (x64.clone(), g64.clone(), b64.clone());
                    let mut r = r64.clone();
                    match which {
                        0 => x[k] += d,
                        1 => g[k] += d,
                        2 => b[k] += d,
                        _ => r.as_mut().expect("a residual")[k] += d,
                    }
                    loss(&s, &x, &g, &b, r.as_deref(), relu_after, &w, eps)
                };
                (bump(h) - bump(-h)) / (2.0 * h)
            };
            let close =
                |got: f32, want: f64| (got as f64 - want).abs() < 1e-3 * want.abs().max(1.0);
            for (k, &d) in dx.iter().enumerate() {
                let n = numeric(k, 0);
                assert!(close(d, n), "{case}: dx[{k}]: {d} vs {n}");
            }
            for c in 0..s.channels {
                let n = numeric(c, 1);
                assert!(close(dg[c], n), "{case}: dgamma[{c}]: {} vs {n}", dg[c]);
                let n = numeric(c, 2);
                assert!(close(db[c], n), "{case}: dbeta[{c}]: {} vs {n}", db[c]);
            }
            // What is left in `dy` is the gradient of the pre-ReLU sum: the residual's.
            if with_residual {
                for (k, &d) in dy.iter().enumerate() {
                    let n = numeric(k, 3);
                    assert!(close(d, n), "{case}: dresidual[{k}]: {d} vs {n}");
                }
            }
        }
    }
}
