//! GELU (the exact, erf-based one of PyTorch's `nn.GELU()`), forward and backward, as one
//! parallel, vectorised pass each.
//!
//! Burn's `gelu` on Flex is five tensor ops, one of them a scalar `libm` `erff` per element
//! on one thread (11 % of a GPT training step in `perf`), and its backward as many again.
//! Here `erf` is Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7, PyTorch's own
//! vectorised `erf` uses it) over an `exp` of plain arithmetic (range reduction by powers of
//! two and a degree-6 polynomial), so the loops vectorise; the backward reuses the same
//! `exp(-x^2 / 2)` for the normal density. Plain multiplies and adds, no fused multiply-add:
//! every instruction set gives the same bits.

use rayon::prelude::*;

use crate::isa::{self, Isa};

/// Elements per parallel chunk: large enough that a chunk's work dwarfs rayon's overhead.
const CHUNK: usize = 1 << 13;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`: the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `exp(v)` for `v <= 0` (0 below -87, where it would be under 1.7e-38): relative error
/// about 2e-7.
#[inline(always)]
pub(crate) fn exp_nonpositive(input: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let v = input.max(-87.0);
    let shifted = v * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = v - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // k is in -126..=0: 2^k is a normal float with exponent bits k + 127.
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    if input < -87.0 { 0.0 } else { p * scale }
}

/// `(erf(z), exp(-z^2))` (Abramowitz and Stegun 7.1.26).
#[inline(always)]
fn erf_and_gauss(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gauss = exp_nonpositive(-(a * a));
    ((1.0 - poly * gauss).copysign(z), gauss)
}

#[inline(always)]
fn forward_generic(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        let (erf, _) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *o = 0.5 * x * (1.0 + erf);
    }
}

#[inline(always)]
fn backward_generic(x: &[f32], grad: &mut [f32]) {
    for (g, &x) in grad.iter_mut().zip(x) {
        // exp(-(x / sqrt 2)^2) = exp(-x^2 / 2), the density's exponential.
        let (erf, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *g *= 0.5 * (1.0 + erf) + x * FRAC_1_SQRT_2PI * gauss;
    }
}

/// One chunk of the forward on the widest vectors `isa` allows.
fn forward_chunk(isa: Isa, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(x: &[f32], out: &mut [f32]) {
            forward_generic(x, out);
        }
        #[target_feature(enable = "avx2")]
        fn avx2(x: &[f32], out: &mut [f32]) {
            forward_generic(x, out);
        }
        // SAFETY: `isa` never exceeds what the CPU reported (`isa::active`).
        match isa {
            Isa::Avx512 => return unsafe { avx512(x, out) },
            Isa::Avx2 => return unsafe { avx2(x, out) },
            Isa::Scalar => {}
        }
    }
    forward_generic(x, out);
}

/// One chunk of the backward on the widest vectors `isa` allows.
fn backward_chunk(isa: Isa, x: &[f32], grad: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(x: &[f32], grad: &mut [f32]) {
            backward_generic(x, grad);
        }
        #[target_feature(enable = "avx2")]
        fn avx2(x: &[f32], grad: &mut [f32]) {
            backward_generic(x, grad);
        }
        // SAFETY: `isa` never exceeds what the CPU reported (`isa::active`).
        match isa {
            Isa::Avx512 => return unsafe { avx512(x, grad) },
            Isa::Avx2 => return unsafe { avx2(x, grad) },
            Isa::Scalar => {}
        }
    }
    backward_generic(x, grad);
}

/// `out = x * Phi(x)`, `Phi` the standard normal distribution function.
///
/// # Panics
/// When the lengths differ.
pub fn gelu(x: &[f32], out: &mut [f32]) {
    gelu_on(isa::active(), x, out);
}

/// `grad *= d gelu / dx at x = Phi(x) + x phi(x)`, in place.
///
/// # Panics
/// When the lengths differ.
pub fn gelu_backward(x: &[f32], grad: &mut [f32]) {
    gelu_backward_on(isa::active(), x, grad);
}

fn gelu_on(isa: Isa, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu output length");
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| forward_chunk(isa, x, o));
}

fn gelu_backward_on(isa: Isa, x: &[f32], grad: &mut [f32]) {
    assert_eq!(x.len(), grad.len(), "gelu gradient length");
    grad.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| backward_chunk(isa, x, g));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_its_range() {
        for i in 0..=87_000 {
            let v = -(i as f32) / 1000.0;
            let (got, want) = (exp_nonpositive(v), f64::from(v).exp());
            assert!(
                (f64::from(got) - want).abs() <= 3e-7 * want,
                "exp({v}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_nonpositive(-100.0), 0.0);
    }

    /// `erf` in `f64` by its Taylor series (|x| <= 3) or its continued fraction (beyond):
    /// an independent reference, far more precise than `f32`.
    fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let value = if a <= 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a^2) / sqrt(pi) * 1 / (a + 1/2 / (a + 1 / (a + 3/2 / (a + ...))))
            let mut fraction = a;
            for k in (1..60).rev() {
                fraction = a + (k as f64 / 2.0) / fraction;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / fraction
        };
        value.copysign(x)
    }

    fn inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (-2400..=2400).map(|i| i as f32 / 200.0).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 3.3e38]);
        x
    }

    #[test]
    fn gelu_and_its_gradient_match_the_definition_on_every_isa() {
        let x = inputs();
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if isa > isa::detected() {
                continue;
            }
            let mut y = vec![0.0; x.len()];
            gelu_on(isa, &x, &mut y);
            let mut g = vec![1.0; x.len()];
            gelu_backward_on(isa, &x, &mut g);
            for ((&x, &y), &g) in x.iter().zip(&y).zip(&g) {
                let x64 = f64::from(x);
                let cdf = 0.5 * (1.0 + erf64(x64 / 2f64.sqrt()));
                let want_y = x64 * cdf;
                let density = (-x64 * x64 / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let want_g = cdf + x64 * density;
                let tolerance = 2e-7 * x64.abs().max(1.0);
                assert!(
                    (f64::from(y) - want_y).abs() <= tolerance,
                    "{isa:?} gelu({x}) = {y}, want {want_y}"
                );
                assert!(
                    (f64::from(g) - want_g).abs() <= 4e-7 * x64.abs().max(1.0),
                    "{isa:?} gelu'({x}) = {g}, want {want_g}"
                );
            }
        }
    }

    #[test]
    fn every_isa_gives_the_same_bits_and_nan_stays_nan() {
        let mut x = inputs();
        x.extend([f32::NAN, f32::INFINITY]);
        let run = |isa| {
            let mut y = vec![0.0; x.len()];
            gelu_on(isa, &x, &mut y);
            let mut g: Vec<f32> = x.iter().map(|v| v * 0.5 - 1.0).collect();
            gelu_backward_on(isa, &x, &mut g);
            (y, g)
        };
        let (y, g) = run(Isa::Scalar);
        let n = x.len();
        assert!(y[n - 2].is_nan() && g[n - 2].is_nan(), "NaN in, NaN out");
        assert_eq!(y[n - 1], f32::INFINITY);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa > isa::detected() {
                continue;
            }
            let (other_y, other_g) = run(isa);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&other_y), "{isa:?} forward");
            assert_eq!(bits(&g), bits(&other_g), "{isa:?} backward");
        }
    }
}
