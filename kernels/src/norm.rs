//! Batch normalisation in training mode on contiguous `f32` NCHW slices: batch statistics,
//! normalisation and its backward, each one or two passes over the activations.
//!
//! Burn's generic `batch_norm_train` (what Flex runs) builds the statistics and the gradient out
//! of tensor ops: each swaps the batch and channel dimensions (a copy of the whole tensor),
//! reduces, broadcasts and subtracts, about a dozen passes and as many fresh buffers per layer.
//! Here the statistics are two reads of each channel, the forward one read and one write, the
//! backward two reads and one write, in parallel over channels.

use rayon::prelude::*;

use crate::isa;

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

    fn check(&self, len: usize, what: &str) {
        assert_eq!(len, self.len(), "{what} length");
    }
}

/// Elements a parallel task aims for: consecutive planes are grouped until they reach this, so
/// that small planes (ResNet's 2x2 and 1x1 maps at 32x32 input: 4 and 1 elements) are not one
/// task, one closure call and one channel lookup each.
const TASK_ELEMENTS: usize = 1 << 13;

impl NormShape {
    /// Consecutive planes (`(sample, channel)` pairs in memory order) per parallel task.
    fn planes_per_task(&self) -> usize {
        (TASK_ELEMENTS / self.plane.max(1)).max(1)
    }

    /// The channels of the planes of task `task` ([`Self::planes_per_task`] planes each), in
    /// order.
    fn task_channels(&self, task: usize) -> impl Iterator<Item = usize> + use<> {
        let channels = self.channels;
        (task * self.planes_per_task()..).map(move |plane| plane % channels)
    }
}

/// Sum of `f(v)` over a plane, in eight `f32` lanes (vectorised) and then `f64`.
#[inline(always)]
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

/// Per plane of `x`, `f(plane, channel)`, in parallel over tasks of consecutive planes, each
/// vectorised at the active level: the per-plane sums the statistics and the backward reduce.
fn plane_sums(s: &NormShape, x: &[f32], f: impl Fn(&[f32], usize) -> f64 + Sync) -> Vec<f64> {
    let isa = isa::active();
    let per = s.planes_per_task();
    let mut sums = vec![0.0f64; s.batch * s.channels];
    sums.par_chunks_mut(per)
        .zip(x.par_chunks(per * s.plane))
        .enumerate()
        .for_each(|(task, (sums, x))| {
            isa::vectorized(
                isa,
                #[inline(always)]
                || {
                    let planes = sums.iter_mut().zip(x.chunks_exact(s.plane));
                    for ((sum, plane), c) in planes.zip(s.task_channels(task)) {
                        *sum = f(plane, c);
                    }
                },
            )
        });
    sums
}

/// Per channel, the sum over samples of the per-plane values `sums` (`[batch, channels]`).
fn channel_totals(s: &NormShape, sums: &[f64]) -> Vec<f64> {
    let mut totals = vec![0.0f64; s.channels];
    for sample in sums.chunks_exact(s.channels) {
        for (t, &v) in totals.iter_mut().zip(sample) {
            *t += v;
        }
    }
    totals
}

/// Per-channel mean and biased variance of `x` (what a training batch norm normalises with and
/// feeds its running statistics), two passes (mean, then squared deviations).
pub fn batch_norm_stats(s: &NormShape, x: &[f32], mean: &mut [f32], var: &mut [f32]) {
    s.check(x.len(), "input");
    assert_eq!(mean.len(), s.channels, "mean length");
    assert_eq!(var.len(), s.channels, "variance length");
    let count = s.count() as f64;
    let sums = plane_sums(
        s,
        x,
        #[inline(always)]
        |plane, _| plane_sum(plane, |v| v),
    );
    for (m, total) in mean.iter_mut().zip(channel_totals(s, &sums)) {
        *m = (total / count) as f32;
    }
    let mean = &*mean;
    let squares = plane_sums(
        s,
        x,
        #[inline(always)]
        |plane, c| {
            let mu = mean[c];
            plane_sum(plane, |v| {
                let d = v - mu;
                d * d
            })
        },
    );
    for (v, total) in var.iter_mut().zip(channel_totals(s, &squares)) {
        *v = (total / count) as f32;
    }
}

/// `1 / sqrt(var + epsilon)` per channel.
fn inv_std(var: &[f32], epsilon: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + epsilon).sqrt()) as f32)
        .collect()
}

/// Whether ReLU, as Burn's Flex computes it, keeps `v`: positive, or NaN (which passes
/// through).
#[inline(always)]
fn relu_keeps(v: f32) -> bool {
    v.is_nan() || v > 0.0
}

/// ReLU as Burn's Flex computes it: NaN passes through. A select, not a branch, so that the
/// loops around it vectorise.
#[inline(always)]
fn relu(v: f32) -> f32 {
    if relu_keeps(v) { v } else { 0.0 }
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
    let scale: Vec<f32> = gamma.iter().zip(&inv).map(|(g, i)| g * i).collect();
    let shift: Vec<f32> = (0..s.channels)
        .map(|c| beta[c] - mean[c] * scale[c])
        .collect();
    let isa = isa::active();
    let (p, per) = (s.plane, s.planes_per_task() * s.plane);
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(task, (o, x))| {
            let r = residual.map(|r| &r[task * per..][..o.len()]);
            isa::vectorized(
                isa,
                #[inline(always)]
                || {
                    let planes = o.chunks_exact_mut(p).zip(x.chunks_exact(p)).enumerate();
                    for ((i, (o, x)), c) in planes.zip(s.task_channels(task)) {
                        let (scale, shift) = (scale[c], shift[c]);
                        match r.map(|r| &r[i * p..][..p]) {
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
                    }
                },
            )
        });
}

/// Per plane: `grad_out` cut by the ReLU mask of `relu_out` (in place), then `sum(dy)` and
/// `sum(dy * (x - mean))`, in parallel over tasks of consecutive planes.
fn masked_gradient_sums(
    s: &NormShape,
    x: &[f32],
    mean: &[f32],
    grad_out: &mut [f32],
    relu_out: Option<&[f32]>,
) -> Vec<(f64, f64)> {
    let isa = isa::active();
    let (p, per) = (s.plane, s.planes_per_task());
    let mut sums = vec![(0.0f64, 0.0f64); s.batch * s.channels];
    sums.par_chunks_mut(per)
        .zip(grad_out.par_chunks_mut(per * p).zip(x.par_chunks(per * p)))
        .enumerate()
        .for_each(|(task, (sums, (dy, x)))| {
            let y = relu_out.map(|y| &y[task * per * p..][..dy.len()]);
            isa::vectorized(
                isa,
                #[inline(always)]
                || {
                    if let Some(y) = y {
                        for (d, &y) in dy.iter_mut().zip(y) {
                            *d = if relu_keeps(y) { *d } else { 0.0 };
                        }
                    }
                    let planes = dy.chunks_exact(p).zip(x.chunks_exact(p));
                    for ((sum, (dy, x)), c) in
                        sums.iter_mut().zip(planes).zip(s.task_channels(task))
                    {
                        *sum = sum_and_dot(dy, x, mean[c]);
                    }
                },
            )
        });
    sums
}

/// `(sum(dy), sum(dy * (x - mu)))` over a plane, in eight `f32` lanes each and then `f64`.
#[inline(always)]
fn sum_and_dot(dy: &[f32], x: &[f32], mu: f32) -> (f64, f64) {
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
    let sums = masked_gradient_sums(s, x, mean, grad_out, relu_out);
    let (sums, dots): (Vec<f64>, Vec<f64>) = sums.into_iter().unzip();
    let (sums, dots) = (channel_totals(s, &sums), channel_totals(s, &dots));
    for c in 0..s.channels {
        grad_beta[c] = sums[c] as f32;
        grad_gamma[c] = (dots[c] * inv[c] as f64) as f32;
    }
    // dx = scale * (dy - mean(dy) - (x - mean) * k) with, per channel, scale = gamma * inv and
    // k = inv * grad_gamma / count (x_hat * mean(dy * x_hat) = (x - mean) * inv^2 *
    // grad_gamma / inv / count).
    let count = s.count() as f32;
    let coefficients: Vec<[f32; 4]> = (0..s.channels)
        .map(|c| {
            let k = inv[c] * grad_gamma[c] / count;
            [gamma[c] * inv[c], grad_beta[c] / count, k, mean[c]]
        })
        .collect();
    input_gradient(s, x, &coefficients, grad_out, grad_x);
}

/// `dx = scale * (dy - mean_dy - (x - mu) * k)` with each channel's `[scale, mean_dy, k, mu]`,
/// into `grad_x` or, without it, over `grad_out`.
fn input_gradient(
    s: &NormShape,
    x: &[f32],
    coefficients: &[[f32; 4]],
    grad_out: &mut [f32],
    grad_x: Option<&mut [f32]>,
) {
    let isa = isa::active();
    let (p, per) = (s.plane, s.planes_per_task() * s.plane);
    let planes = |task: usize, dx: &mut [f32], x: &[f32], dy: Option<&[f32]>| {
        isa::vectorized(
            isa,
            #[inline(always)]
            || {
                let rows = dx.chunks_exact_mut(p).zip(x.chunks_exact(p)).enumerate();
                for ((i, (dx, x)), c) in rows.zip(s.task_channels(task)) {
                    let [scale, mean_dy, k, mu] = coefficients[c];
                    match dy {
                        Some(dy) => {
                            let dy = &dy[i * p..][..p];
                            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                                *dx = scale * (dy - mean_dy - (x - mu) * k);
                            }
                        }
                        None => {
                            for (d, &x) in dx.iter_mut().zip(x) {
                                *d = scale * (*d - mean_dy - (x - mu) * k);
                            }
                        }
                    }
                }
            },
        )
    };
    match grad_x {
        Some(grad_x) => grad_x
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(grad_out.par_chunks(per)))
            .enumerate()
            .for_each(|(task, (dx, (x, dy)))| planes(task, dx, x, Some(dy))),
        None => grad_out
            .par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .enumerate()
            .for_each(|(task, (d, x))| planes(task, d, x, None)),
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
                let vals: Vec<f64> = (0..s.batch)
                    .flat_map(|n| &x[(n * s.channels + c) * s.plane..][..s.plane])
                    .map(|&v| v as f64)
                    .collect();
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

    /// Shapes cut into several parallel tasks (planes of 1,500 elements, five per task, and
    /// 1-element planes whose tasks start mid-sample) against the closed forms in `f64`: the
    /// channel of every plane has to follow it across the task boundaries.
    #[test]
    fn planes_grouped_into_tasks_keep_their_channels() {
        let eps = 1e-5;
        let shapes = [
            NormShape {
                batch: 3,
                channels: 7,
                plane: 1500,
            },
            NormShape {
                batch: 16,
                channels: 1200,
                plane: 1,
            },
        ];
        for (i, s) in shapes.into_iter().enumerate() {
            assert!(s.len() > 2 * TASK_ELEMENTS, "{s:?} spans several tasks");
            let seed = 100 + 10 * i as u32;
            // Per-channel offsets, so that a plane normalised with its neighbour's statistics
            // is far off.
            let x: Vec<f32> = values(s.len(), seed)
                .iter()
                .enumerate()
                .map(|(k, v)| v + 2.0 * (k / s.plane % s.channels % 5) as f32)
                .collect();
            let gamma = values(s.channels, seed + 1);
            let beta = values(s.channels, seed + 2);
            let residual = values(s.len(), seed + 3);
            let dy0 = values(s.len(), seed + 4);
            let (mut mean, mut var) = (vec![0.0; s.channels], vec![0.0; s.channels]);
            batch_norm_stats(&s, &x, &mut mean, &mut var);
            let mut out = vec![0.0; s.len()];
            let args = (&mean, &var, &gamma, &beta);
            batch_norm_forward(
                &s,
                &x,
                args.0,
                args.1,
                args.2,
                args.3,
                eps,
                Some(&residual),
                true,
                &mut out,
            );
            let (mut dx, mut dg, mut db) = (
                vec![0.0; s.len()],
                vec![0.0; s.channels],
                vec![0.0; s.channels],
            );
            let mut dy = dy0.clone();
            let (m, v, g) = (&mean, &var, &gamma);
            batch_norm_backward(
                &s,
                &x,
                m,
                v,
                g,
                eps,
                &mut dy,
                Some(&out),
                Some(&mut dx),
                &mut dg,
                &mut db,
            );
            let close = |got: f32, want: f64, what: &str| {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{s:?} {what}: {got} vs {want}"
                );
            };
            let n = (s.batch * s.plane) as f64;
            for c in 0..s.channels {
                let at: Vec<usize> = (0..s.batch)
                    .flat_map(|b| ((b * s.channels + c) * s.plane..).take(s.plane))
                    .collect();
                let mu = at.iter().map(|&k| x[k] as f64).sum::<f64>() / n;
                let var_c = at.iter().map(|&k| (x[k] as f64 - mu).powi(2)).sum::<f64>() / n;
                close(mean[c], mu, "mean");
                close(var[c], var_c, "var");
                let inv = 1.0 / (var_c + eps).sqrt();
                let hat = |k: usize| (x[k] as f64 - mu) * inv;
                let pre = |k: usize| hat(k) * gamma[c] as f64 + beta[c] as f64 + residual[k] as f64;
                // The mask the backward is given: the forward's output (checked above).
                let masked = |k: usize| if out[k] > 0.0 { dy0[k] as f64 } else { 0.0 };
                let sum = at.iter().map(|&k| masked(k)).sum::<f64>();
                let dot = at.iter().map(|&k| masked(k) * hat(k)).sum::<f64>();
                close(db[c], sum, "dbeta");
                close(dg[c], dot, "dgamma");
                for &k in &at {
                    close(out[k], pre(k).max(0.0), "output");
                    let want = gamma[c] as f64 * inv * (masked(k) - sum / n - hat(k) * dot / n);
                    close(dx[k], want, "dx");
                    close(dy[k], masked(k), "masked gradient");
                }
            }
        }
    }
}
