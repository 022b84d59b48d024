//! 2-D max-pooling (dilation 1, floor mode, symmetric padding that never wins) on contiguous
//! `f32` NCHW slices: the forward pass records the winning input position of every output as a
//! `u32` offset in its plane, and the backward pass adds each output gradient there.
//!
//! Flex runs max-pool as a 3-D pool with `i64` indices and a division per element to locate
//! windows; this is the 2-D loop with precomputed valid ranges, parallel over planes.

use rayon::prelude::*;

/// The geometry of one 2-D max-pool over a batch, NCHW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dShape {
    /// Samples in the batch.
    pub batch: usize,
    /// Channels (pooled independently).
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Padding on each side, along height and width (padded positions never win).
    pub padding: [usize; 2],
}

impl Pool2dShape {
    /// Whether the geometry describes a pool with at least one output element, every window of
    /// which holds at least one input position (padding at most half the window, as in PyTorch).
    pub fn is_valid(&self) -> bool {
        let positive = [
            self.batch,
            self.channels,
            self.height,
            self.width,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
        ];
        positive.iter().all(|&n| n > 0)
            && 2 * self.padding[0] <= self.kernel[0]
            && 2 * self.padding[1] <= self.kernel[1]
            && self.height + 2 * self.padding[0] >= self.kernel[0]
            && self.width + 2 * self.padding[1] >= self.kernel[1]
    }

    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
    }

    /// Input elements.
    pub fn input_len(&self) -> usize {
        self.batch * self.channels * self.height * self.width
    }

    /// Output elements.
    pub fn output_len(&self) -> usize {
        self.batch * self.channels * self.out_height() * self.out_width()
    }
}

/// The input positions `o * stride - pad + 0..kernel` clipped to `0..input`.
fn window(
    o: usize,
    stride: usize,
    kernel: usize,
    pad: usize,
    input: usize,
) -> std::ops::Range<usize> {
    let start = (o * stride).saturating_sub(pad);
    let end = (o * stride + kernel).saturating_sub(pad).min(input);
    start..end.max(start)
}

/// Max-pool forward: `out` holds each window's maximum and `indices` the offset (`y * W + x`) of
/// the first maximal input in its plane. A NaN wins its window (the last NaN, as in PyTorch's
/// `val > max || isnan(val)` scan).
pub fn max_pool2d_forward(s: &Pool2dShape, x: &[f32], out: &mut [f32], indices: &mut [u32]) {
    assert!(s.is_valid(), "invalid max-pool geometry {s:?}");
    assert_eq!(x.len(), s.input_len(), "input length");
    assert_eq!(out.len(), s.output_len(), "output length");
    assert_eq!(indices.len(), s.output_len(), "indices length");
    assert!(
        s.height * s.width <= u32::MAX as usize,
        "plane too large for u32 indices"
    );
    let (oh, ow) = (s.out_height(), s.out_width());
    let plane_in = s.height * s.width;
    let plane_out = oh * ow;
    let halving = s.kernel == [2, 2] && s.stride == [2, 2] && s.padding == [0, 0];
    let rows = windows(oh, s.stride[0], s.kernel[0], s.padding[0], s.height);
    let cols = windows(ow, s.stride[1], s.kernel[1], s.padding[1], s.width);
    out.par_chunks_mut(plane_out)
        .zip(indices.par_chunks_mut(plane_out))
        .zip(x.par_chunks(plane_in))
        .for_each(|((o, idx), xp)| {
            if halving {
                max_pool_2x2(s.width, xp, ow, o, idx);
            } else {
                max_pool_windows(s.width, (&rows, &cols), xp, o, idx);
            }
        });
}

/// Whether `v` replaces `best` in a max scan (larger, or NaN).
#[inline(always)]
fn wins(v: f32, best: f32) -> bool {
    (v > best) | v.is_nan()
}

/// The common 2x2 window at stride 2 without padding, as a tournament: the top pair, the bottom
/// pair, then their winners. Each comparison keeps the earlier input on a tie, and top inputs
/// come before bottom ones, so the winner is the first maximal input in row-major order, as in
/// the general scan. Rows run 16 (AVX-512) or 8 (AVX2) outputs at a time, the rest scalar; every
/// path gives the same bits.
fn max_pool_2x2(width: usize, xp: &[f32], ow: usize, o: &mut [f32], idx: &mut [u32]) {
    let isa = crate::isa::active();
    for ((orow, irow), oy) in o
        .chunks_exact_mut(ow)
        .zip(idx.chunks_exact_mut(ow))
        .zip(0..)
    {
        let top = 2 * oy * width;
        let rows = Rows2x2 {
            r0: &xp[top..top + width],
            r1: &xp[top + width..top + 2 * width],
            top,
            width,
        };
        let done = simd_2x2::run(isa, &rows, orow, irow);
        rows.scalar(done, orow, irow);
    }
}

/// Two input rows of a 2x2 stride-2 pool and where the top one starts in its plane.
struct Rows2x2<'a> {
    r0: &'a [f32],
    r1: &'a [f32],
    top: usize,
    width: usize,
}

impl Rows2x2<'_> {
    /// Outputs `from..` of the row pair, one at a time.
    fn scalar(&self, from: usize, orow: &mut [f32], irow: &mut [u32]) {
        let (r0, r1) = (self.r0, self.r1);
        for ox in from..orow.len() {
            let c = 2 * ox;
            let (a, b, cc, d) = (r0[c], r0[c + 1], r1[c], r1[c + 1]);
            let top_right = wins(b, a);
            let upper = if top_right { b } else { a };
            let upper_at = c + top_right as usize;
            let bottom_right = wins(d, cc);
            let lower = if bottom_right { d } else { cc };
            let lower_at = self.width + c + bottom_right as usize;
            let take_lower = wins(lower, upper);
            orow[ox] = if take_lower { lower } else { upper };
            irow[ox] = (self.top + if take_lower { lower_at } else { upper_at }) as u32;
        }
    }
}

/// The SIMD versions of [`Rows2x2::scalar`]: each returns how many leading outputs it wrote.
mod simd_2x2 {
    use super::Rows2x2;
    use crate::isa::Isa;

    /// The widest version `isa` allows.
    pub(super) fn run(isa: Isa, rows: &Rows2x2, orow: &mut [f32], irow: &mut [u32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` never exceeds what the CPU reported (`isa::active`).
            match isa {
                Isa::Avx512 => return unsafe { avx512(rows, orow, irow) },
                Isa::Avx2 => return unsafe { avx2(rows, orow, irow) },
                Isa::Scalar => {}
            }
        }
        let _ = (isa, rows, orow, irow);
        0
    }

    /// 16 outputs per step (the row's last step masked): two 16-lane loads per row, split into
    /// even and odd columns.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(rows: &Rows2x2, orow: &mut [f32], irow: &mut [u32]) -> usize {
        use std::arch::x86_64::*;
        let n = orow.len().min(irow.len());
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let one = _mm512_set1_epi32(1);
        let lanes = |count: usize| ((1u32 << count.min(16)) - 1) as __mmask16;
        for ox in (0..n).step_by(16) {
            let c = 2 * ox;
            // The last step of a row takes the k < 16 outputs left, through masks.
            let k = (n - ox).min(16);
            let (lo, hi, out) = (lanes(2 * k), lanes(2 * k - (2 * k).min(16)), lanes(k));
            // SAFETY: the unmasked lanes read floats c..c + 2k, and 2 * (ox + k) <= 2 * ow
            // <= width; masked lanes are not read.
            let (t0, t1, b0, b1) = unsafe {
                let (p0, p1) = (rows.r0.as_ptr().add(c), rows.r1.as_ptr().add(c));
                (
                    _mm512_maskz_loadu_ps(lo, p0),
                    _mm512_maskz_loadu_ps(hi, p0.add(16)),
                    _mm512_maskz_loadu_ps(lo, p1),
                    _mm512_maskz_loadu_ps(hi, p1.add(16)),
                )
            };
            let (a, b) = (
                _mm512_permutex2var_ps(t0, even, t1),
                _mm512_permutex2var_ps(t0, odd, t1),
            );
            let (cc, d) = (
                _mm512_permutex2var_ps(b0, even, b1),
                _mm512_permutex2var_ps(b0, odd, b1),
            );
            let base = _mm512_add_epi32(_mm512_set1_epi32((rows.top + c) as i32), even);
            let tr = wins512(b, a);
            let upper = _mm512_mask_blend_ps(tr, a, b);
            let upper_at = _mm512_mask_add_epi32(base, tr, base, one);
            let br = wins512(d, cc);
            let lower = _mm512_mask_blend_ps(br, cc, d);
            let lower_base = _mm512_add_epi32(base, _mm512_set1_epi32(rows.width as i32));
            let lower_at = _mm512_mask_add_epi32(lower_base, br, lower_base, one);
            let take = wins512(lower, upper);
            // SAFETY: the k stored lanes end at ox + k <= n, within both output rows.
            unsafe {
                _mm512_mask_storeu_ps(
                    orow.as_mut_ptr().add(ox),
                    out,
                    _mm512_mask_blend_ps(take, upper, lower),
                );
                _mm512_mask_storeu_epi32(
                    irow.as_mut_ptr().add(ox).cast(),
                    out,
                    _mm512_mask_blend_epi32(take, upper_at, lower_at),
                );
            }
        }
        n
    }

    /// 8 outputs per step (the row's last step masked): two 8-lane loads per row, split into even
    /// and odd columns.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(rows: &Rows2x2, orow: &mut [f32], irow: &mut [u32]) -> usize {
        use std::arch::x86_64::*;
        let n = orow.len().min(irow.len());
        let steps = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lanes = |count: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), iota);
        for ox in (0..n).step_by(8) {
            let c = 2 * ox;
            // The last step of a row takes the k < 8 outputs left, through masks.
            let k = (n - ox).min(8);
            let (lo, hi, out) = (lanes(2 * k), lanes(2 * k - (2 * k).min(8)), lanes(k));
            // SAFETY: the unmasked lanes read floats c..c + 2k, and 2 * (ox + k) <= 2 * ow
            // <= width; masked lanes are not read.
            let (t0, t1, b0, b1) = unsafe {
                let (p0, p1) = (rows.r0.as_ptr().add(c), rows.r1.as_ptr().add(c));
                (
                    _mm256_maskload_ps(p0, lo),
                    _mm256_maskload_ps(p0.add(8), hi),
                    _mm256_maskload_ps(p1, lo),
                    _mm256_maskload_ps(p1.add(8), hi),
                )
            };
            let ((a, b), (cc, d)) = (split256(t0, t1), split256(b0, b1));
            let base = _mm256_add_epi32(_mm256_set1_epi32((rows.top + c) as i32), steps);
            // A comparison mask is all ones (-1) where true: subtracting it adds 1 there.
            let tr = wins256(b, a);
            let upper = _mm256_blendv_ps(a, b, tr);
            let upper_at = _mm256_sub_epi32(base, _mm256_castps_si256(tr));
            let br = wins256(d, cc);
            let lower = _mm256_blendv_ps(cc, d, br);
            let lower_base = _mm256_add_epi32(base, _mm256_set1_epi32(rows.width as i32));
            let lower_at = _mm256_sub_epi32(lower_base, _mm256_castps_si256(br));
            let take = wins256(lower, upper);
            let at = _mm256_blendv_ps(
                _mm256_castsi256_ps(upper_at),
                _mm256_castsi256_ps(lower_at),
                take,
            );
            // SAFETY: the k stored lanes end at ox + k <= n, within both output rows.
            unsafe {
                _mm256_maskstore_ps(
                    orow.as_mut_ptr().add(ox),
                    out,
                    _mm256_blendv_ps(upper, lower, take),
                );
                _mm256_maskstore_epi32(
                    irow.as_mut_ptr().add(ox).cast(),
                    out,
                    _mm256_castps_si256(at),
                );
            }
        }
        n
    }
    /// [`super::wins`] on 16 lanes, as a mask.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn wins512(
        v: std::arch::x86_64::__m512,
        best: std::arch::x86_64::__m512,
    ) -> std::arch::x86_64::__mmask16 {
        use std::arch::x86_64::*;
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
    }

    /// [`super::wins`] on 8 lanes, as an all-ones-where-true mask.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    fn wins256(
        v: std::arch::x86_64::__m256,
        best: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(v, best),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
        )
    }

    /// The even and odd lanes of `lo` then `hi`: `[lo0 lo2 .. hi6]`, `[lo1 lo3 .. hi7]`.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    fn split256(
        lo: std::arch::x86_64::__m256,
        hi: std::arch::x86_64::__m256,
    ) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // Lanes [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then 64-bit lanes reordered to 0 2 1 3.
        let e = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
        let o = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
        let fix = _mm256_permute4x64_pd::<0b11_01_10_00>;
        (
            _mm256_castpd_ps(fix(_mm256_castps_pd(e))),
            _mm256_castpd_ps(fix(_mm256_castps_pd(o))),
        )
    }
}

/// The windows of every output position along one dimension (see [`window`]).
fn windows(out: usize, stride: usize, kernel: usize, pad: usize, input: usize) -> Vec<Range> {
    (0..out)
        .map(|o| window(o, stride, kernel, pad, input))
        .collect()
}

type Range = std::ops::Range<usize>;

/// Any window, stride and padding: windows clipped to the plane (the reference the tests hold
/// the fast paths to).
#[cfg(test)]
fn max_pool_plane(s: &Pool2dShape, xp: &[f32], o: &mut [f32], idx: &mut [u32]) {
    let rows = windows(
        s.out_height(),
        s.stride[0],
        s.kernel[0],
        s.padding[0],
        s.height,
    );
    let cols = windows(
        s.out_width(),
        s.stride[1],
        s.kernel[1],
        s.padding[1],
        s.width,
    );
    max_pool_windows(s.width, (&rows, &cols), xp, o, idx);
}

/// [`max_pool_plane`] with the windows along each dimension worked out (once per call, not
/// per plane and output). A whole 3x3 window (ResNet's stem pool, away from the border) is
/// scanned unrolled, in the same order.
fn max_pool_windows(
    width: usize,
    (rows, cols): (&[Range], &[Range]),
    xp: &[f32],
    o: &mut [f32],
    idx: &mut [u32],
) {
    // Offsets of a 3x3 window's inputs after its first, in row-major order.
    let after_first = [
        1,
        2,
        width,
        width + 1,
        width + 2,
        2 * width,
        2 * width + 1,
        2 * width + 2,
    ];
    let outputs = o.iter_mut().zip(idx.iter_mut());
    let windows = rows.iter().flat_map(|r| cols.iter().map(move |c| (r, c)));
    for ((o, idx), (rows, cols)) in outputs.zip(windows) {
        let first = rows.start * width + cols.start;
        let (mut best, mut best_at) = (f32::NEG_INFINITY, first);
        if rows.len() == 3 && cols.len() == 3 {
            // The first input always wins against minus infinity or equals it.
            (best, best_at) = (xp[first], first);
            for d in after_first {
                let v = xp[first + d];
                let take = wins(v, best);
                best = if take { v } else { best };
                best_at = if take { first + d } else { best_at };
            }
        } else {
            for iy in rows.clone() {
                let row = &xp[iy * width..(iy + 1) * width];
                for ix in cols.clone() {
                    let v = row[ix];
                    let take = wins(v, best);
                    best = if take { v } else { best };
                    best_at = if take { iy * width + ix } else { best_at };
                }
            }
        }
        *o = best;
        *idx = best_at as u32;
    }
}

/// Max-pool backward: each output gradient is added to `grad_x` at its recorded input position
/// (pass zeros, e.g. a fresh `vec![0.0; n]`, for the gradient itself).
pub fn max_pool2d_backward(s: &Pool2dShape, grad_out: &[f32], indices: &[u32], grad_x: &mut [f32]) {
    assert!(s.is_valid(), "invalid max-pool geometry {s:?}");
    assert_eq!(grad_out.len(), s.output_len(), "output gradient length");
    assert_eq!(indices.len(), s.output_len(), "indices length");
    assert_eq!(grad_x.len(), s.input_len(), "input gradient length");
    let plane_in = s.height * s.width;
    let plane_out = s.out_height() * s.out_width();
    grad_x
        .par_chunks_mut(plane_in)
        .zip(grad_out.par_chunks(plane_out))
        .zip(indices.par_chunks(plane_out))
        .for_each(|((gx, go), idx)| {
            for (&g, &i) in go.iter().zip(idx) {
                gx[i as usize] += g;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_clip_to_the_input() {
        assert_eq!(window(0, 2, 3, 1, 5), 0..2);
        assert_eq!(window(2, 2, 3, 1, 5), 3..5);
        assert_eq!(window(1, 2, 2, 0, 4), 2..4);
    }

    #[test]
    fn forward_and_backward_on_a_small_plane() {
        // 1 x 1 x 4 x 4, 2x2 stride 2: four windows with known maxima.
        let s = Pool2dShape {
            batch: 1,
            channels: 1,
            height: 4,
            width: 4,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 2.0, 2.0,
            3.0, 4.0, 8.0, 1.0,
            0.0, -1.0, 7.0, 7.0,
            -2.0, 9.0, 6.0, 7.0,
        ];
        let mut out = [0.0; 4];
        let mut idx = [0u32; 4];
        max_pool2d_forward(&s, &x, &mut out, &mut idx);
        assert_eq!(out, [5.0, 8.0, 9.0, 7.0]);
        // Ties go to the first position in row-major order (10, not 11 or 15).
        assert_eq!(idx, [1, 6, 13, 10]);
        let mut gx = [0.0; 16];
        max_pool2d_backward(&s, &[1.0, 2.0, 3.0, 4.0], &idx, &mut gx);
        let mut want = [0.0; 16];
        want[1] = 1.0;
        want[6] = 2.0;
        want[13] = 3.0;
        want[10] = 4.0;
        assert_eq!(gx, want);
    }

    #[test]
    fn nan_wins_its_window() {
        let s = Pool2dShape {
            batch: 1,
            channels: 1,
            height: 2,
            width: 2,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        let mut out = [0.0];
        let mut idx = [0u32];
        max_pool2d_forward(&s, &[1.0, f32::NAN, 3.0, 2.0], &mut out, &mut idx);
        assert!(out[0].is_nan());
        assert_eq!(idx, [1]);
        // The general path (3x3, padding 1) on the same plane: the NaN still wins.
        let s = Pool2dShape {
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
            ..s
        };
        let mut out = [0.0; 4];
        let mut idx = [0u32; 4];
        max_pool2d_forward(&s, &[1.0, f32::NAN, 3.0, 2.0], &mut out, &mut idx);
        assert!(out.iter().all(|v| v.is_nan()));
        assert_eq!(idx, [1; 4]);
    }

    #[test]
    fn the_2x2_path_equals_the_general_path() {
        let base = Pool2dShape {
            batch: 2,
            channels: 3,
            height: 9,
            width: 7,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        let x: Vec<f32> = (0..base.input_len())
            .map(|i| ((i * 7919) % 101) as f32 - 50.0)
            .collect();
        let (mut fast, mut fast_idx) =
            (vec![0.0; base.output_len()], vec![0u32; base.output_len()]);
        max_pool2d_forward(&base, &x, &mut fast, &mut fast_idx);
        let plane_in = base.height * base.width;
        let plane_out = base.out_height() * base.out_width();
        for p in 0..base.batch * base.channels {
            let (mut o, mut idx) = (vec![0.0; plane_out], vec![0u32; plane_out]);
            max_pool_plane(&base, &x[p * plane_in..][..plane_in], &mut o, &mut idx);
            assert_eq!(o, fast[p * plane_out..][..plane_out]);
            assert_eq!(idx, fast_idx[p * plane_out..][..plane_out]);
        }
    }
    #[test]
    fn every_instruction_set_gives_the_scalar_bits() {
        use crate::isa::{Isa, detected};
        // Widths around the 8- and 16-output steps, ties (values from a small set), NaNs and
        // infinities; an odd width leaves its last column out.
        for width in [2, 7, 16, 31, 32, 33, 48, 64, 70] {
            let height = 4;
            let x: Vec<f32> = (0..height * width)
                .map(|i| match (i * 7919) % 23 {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    3 => -0.0,
                    k => (k % 5) as f32 - 2.0,
                })
                .collect();
            let ow = width / 2;
            let (mut want, mut want_at) = (vec![0.0; 2 * ow], vec![0u32; 2 * ow]);
            for (oy, (o, at)) in want.chunks_mut(ow).zip(want_at.chunks_mut(ow)).enumerate() {
                let top = 2 * oy * width;
                let rows = Rows2x2 {
                    r0: &x[top..top + width],
                    r1: &x[top + width..top + 2 * width],
                    top,
                    width,
                };
                rows.scalar(0, o, at);
            }
            for isa in [Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&i| i <= detected())
            {
                let (mut got, mut got_at) = (vec![0.0; 2 * ow], vec![0u32; 2 * ow]);
                for (oy, (o, at)) in got.chunks_mut(ow).zip(got_at.chunks_mut(ow)).enumerate() {
                    let top = 2 * oy * width;
                    let rows = Rows2x2 {
                        r0: &x[top..top + width],
                        r1: &x[top + width..top + 2 * width],
                        top,
                        width,
                    };
                    let done = simd_2x2::run(isa, &rows, o, at);
                    rows.scalar(done, o, at);
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa} values, width {width}");
                assert_eq!(got_at, want_at, "{isa} indices, width {width}");
            }
        }
    }

    /// ResNet's stem pool (3x3, stride 2, padding 1) and a stride-1 3x3 pool, whose interior
    /// windows take the unrolled scan, against the definition: the first maximal input in
    /// row-major order, the last NaN where there is one; ties, NaNs and minus infinity included.
    #[test]
    fn whole_3x3_windows_equal_the_definition() {
        for stride in [1, 2] {
            let s = Pool2dShape {
                batch: 2,
                channels: 3,
                height: 9,
                width: 8,
                kernel: [3, 3],
                stride: [stride, stride],
                padding: [1, 1],
            };
            let x: Vec<f32> = (0..s.input_len())
                .map(
                    |i| match (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        // Zeros and ones: many ties for the first maximum.
                        h => (h % 2) as f32,
                    },
                )
                .collect();
            let (mut out, mut idx) = (vec![0.0; s.output_len()], vec![0u32; s.output_len()]);
            max_pool2d_forward(&s, &x, &mut out, &mut idx);
            let (oh, ow) = (s.out_height(), s.out_width());
            let plane = s.height * s.width;
            for (k, (&got, &at)) in out.iter().zip(&idx).enumerate() {
                let (p, oy, ox) = (k / (oh * ow), k / ow % oh, k % ow);
                let mut want: Option<(f32, usize)> = None;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let (iy, ix) = (
                            (oy * stride + dy) as isize - 1,
                            (ox * stride + dx) as isize - 1,
                        );
                        if iy < 0 || ix < 0 || iy >= s.height as isize || ix >= s.width as isize {
                            continue;
                        }
                        let i = iy as usize * s.width + ix as usize;
                        let v = x[p * plane + i];
                        let take = match want {
                            None => true,
                            Some((best, _)) => v > best || v.is_nan(),
                        };
                        if take {
                            want = Some((v, i));
                        }
                    }
                }
                let (value, position) = want.expect("every window holds an input");
                assert_eq!(at as usize, position, "stride {stride}, output {k}");
                assert!(
                    got == value || (got.is_nan() && value.is_nan()),
                    "stride {stride}, output {k}"
                );
            }
        }
    }
}
