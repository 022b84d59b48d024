//! Layer normalisation over the last dimension, forward and backward, as one parallel pass
//! over rows each.
//!
//! Burn's `layer_norm` is eight tensor ops (mean, subtract, square, mean, add, square root,
//! divide, scale and shift), each a fresh buffer and, on Flex, one thread; its backward runs
//! the backward of each. Here the forward writes the output and keeps each row's mean and
//! reciprocal standard deviation; the backward computes the input gradient row by row
//! (`dx = rstd (g γ - mean(g γ) - x̂ mean(g γ x̂))`) and sums γ's and β's gradients per chunk of
//! rows, the chunks' partial sums then added in order (the same bits on every run).

use rayon::prelude::*;

/// Rows per parallel chunk.
const ROWS: usize = 64;

/// `out = (x - mean) / sqrt(var + epsilon) * gamma + beta` per row of `gamma.len()` values;
/// `stats` gets each row's mean and `1 / sqrt(var + epsilon)` (biased variance).
///
/// # Panics
/// When the lengths do not fit: `x` and `out` whole rows, `beta` as `gamma`, `stats` two per
/// row.
pub fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    out: &mut [f32],
    stats: &mut [f32],
) {
    let c = gamma.len();
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "whole rows of gamma's width"
    );
    assert_eq!(
        (beta.len(), out.len()),
        (c, x.len()),
        "beta and output lengths"
    );
    assert_eq!(stats.len(), 2 * (x.len() / c), "two statistics per row");
    out.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(stats.par_chunks_mut(2 * ROWS))
        .for_each(|((out, x), stats)| {
            for ((y, x), stat) in out
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(stats.chunks_exact_mut(2))
            {
                let mean = x.iter().sum::<f32>() / c as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let rstd = 1.0 / (var + epsilon).sqrt();
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * rstd * g + b;
                }
                stat.copy_from_slice(&[mean, rstd]);
            }
        });
}

/// The gradients of [`layer_norm`]: `grad_x` (written over `grad`, the output's gradient),
/// and gamma's and beta's, from the forward's `stats`.
///
/// # Panics
/// When the lengths do not fit (as [`layer_norm`]).
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[f32],
    grad: &mut [f32],
    grad_gamma: &mut [f32],
    grad_beta: &mut [f32],
) {
    let c = gamma.len();
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "whole rows of gamma's width"
    );
    assert_eq!(grad.len(), x.len(), "gradient length");
    assert_eq!(
        (grad_gamma.len(), grad_beta.len()),
        (c, c),
        "parameter gradients"
    );
    assert_eq!(stats.len(), 2 * (x.len() / c), "two statistics per row");
    let partials: Vec<(Vec<f32>, Vec<f32>)> = grad
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(stats.par_chunks(2 * ROWS))
        .map(|((grad, x), stats)| backward_rows(x, gamma, stats, grad))
        .collect();
    grad_gamma.fill(0.0);
    grad_beta.fill(0.0);
    for (dg, db) in partials {
        grad_gamma.iter_mut().zip(&dg).for_each(|(s, v)| *s += v);
        grad_beta.iter_mut().zip(&db).for_each(|(s, v)| *s += v);
    }
}

/// One chunk of rows: the input gradient in place, and the chunk's gamma and beta sums.
fn backward_rows(
    x: &[f32],
    gamma: &[f32],
    stats: &[f32],
    grad: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    for ((g, x), stat) in grad
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(stats.chunks_exact(2))
    {
        let (mean, rstd) = (stat[0], stat[1]);
        let (mut sum_gg, mut sum_ggx) = (0.0f32, 0.0f32);
        for (i, (&g, &x)) in g.iter().zip(x).enumerate() {
            let xhat = (x - mean) * rstd;
            dg[i] += g * xhat;
            db[i] += g;
            sum_gg += g * gamma[i];
            sum_ggx += g * gamma[i] * xhat;
        }
        let (a, b) = (sum_gg / c as f32, sum_ggx / c as f32);
        for (i, (g, &x)) in g.iter_mut().zip(x).enumerate() {
            let xhat = (x - mean) * rstd;
            *g = rstd * (*g * gamma[i] - a - xhat * b);
        }
    }
    (dg, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64, and its gradient by the chain rule term by term.
    #[test]
    fn forward_and_backward_match_the_definition() {
        let (rows, c) = (131, 37);
        let value = |i: usize, k: u64| ((i as u64 * k + 7) % 101) as f32 / 17.0 - 3.0;
        let x: Vec<f32> = (0..rows * c).map(|i| value(i, 31) * 1.5 + 4.0).collect();
        let gamma: Vec<f32> = (0..c).map(|i| value(i, 13) * 0.3 + 1.0).collect();
        let beta: Vec<f32> = (0..c).map(|i| value(i, 7) * 0.1).collect();
        let up: Vec<f32> = (0..rows * c).map(|i| value(i, 17)).collect();
        let eps = 1e-5;
        let (mut y, mut stats) = (vec![0.0; rows * c], vec![0.0; 2 * rows]);
        layer_norm(&x, &gamma, &beta, eps, &mut y, &mut stats);
        let mut dx = up.clone();
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        layer_norm_backward(&x, &gamma, &stats, &mut dx, &mut dg, &mut db);
        let (mut want_dg, mut want_db) = (vec![0.0f64; c], vec![0.0f64; c]);
        for r in 0..rows {
            let row: Vec<f64> = x[r * c..(r + 1) * c]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + f64::from(eps)).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = (0..c).map(|i| f64::from(up[r * c + i])).collect();
            let gg: Vec<f64> = (0..c).map(|i| g[i] * f64::from(gamma[i])).collect();
            let a = gg.iter().sum::<f64>() / c as f64;
            let b = gg.iter().zip(&xhat).map(|(p, q)| p * q).sum::<f64>() / c as f64;
            for i in 0..c {
                let want_y = xhat[i] * f64::from(gamma[i]) + f64::from(beta[i]);
                let want_dx = rstd * (gg[i] - a - xhat[i] * b);
                let (got_y, got_dx) = (f64::from(y[r * c + i]), f64::from(dx[r * c + i]));
                assert!(
                    (got_y - want_y).abs() < 2e-5,
                    "y[{r},{i}] {got_y} vs {want_y}"
                );
                assert!(
                    (got_dx - want_dx).abs() < 2e-5,
                    "dx[{r},{i}] {got_dx} vs {want_dx}"
                );
                want_dg[i] += g[i] * xhat[i];
                want_db[i] += g[i];
            }
        }
        for i in 0..c {
            let (g, b) = (f64::from(dg[i]), f64::from(db[i]));
            assert!(
                (g - want_dg[i]).abs() < 1e-3,
                "dgamma[{i}] {g} vs {}",
                want_dg[i]
            );
            assert!(
                (b - want_db[i]).abs() < 1e-3,
                "dbeta[{i}] {b} vs {}",
                want_db[i]
            );
        }
    }
}
