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
    let stem = StemColumns::of(s.width, &cols);
    out.par_chunks_mut(plane_out)
        .zip(indices.par_chunks_mut(plane_out))
        .zip(x.par_chunks(plane_in))
        .for_each_init(SeparableScratch::default, |scratch, ((o, idx), xp)| {
            if halving {
                max_pool_2x2(s.width, xp, ow, o, idx);
            } else {
                let windows = (&rows[..], &cols[..], stem.as_ref());
                max_pool_separable(s.width, windows, scratch, xp, (o, idx));
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

/// Any window, stride and padding: windows clipped to the plane, each scanned in row-major
/// order (the reference the tests hold the fast paths to).
#[cfg(test)]
fn max_pool_plane(s: &Pool2dShape, xp: &[f32], o: &mut [f32], idx: &mut [u32]) {
    let (oh, ow) = (s.out_height(), s.out_width());
    for oy in 0..oh {
        let rows = window(oy, s.stride[0], s.kernel[0], s.padding[0], s.height);
        for ox in 0..ow {
            let cols = window(ox, s.stride[1], s.kernel[1], s.padding[1], s.width);
            let mut best = f32::NEG_INFINITY;
            let mut best_at = rows.start * s.width + cols.start;
            for iy in rows.clone() {
                for ix in cols.clone() {
                    let v = xp[iy * s.width + ix];
                    if wins(v, best) {
                        (best, best_at) = (v, iy * s.width + ix);
                    }
                }
            }
            o[oy * ow + ox] = best;
            idx[oy * ow + ox] = best_at as u32;
        }
    }
}

/// [`max_pool_plane`] as two scans, with the windows along each dimension worked out once per
/// call: along each input row (the maximum of each output column's window, [`row_maxima`]),
/// then down the rows of each output's window, element-wise over a whole output row (which
/// vectorises). The result is the general scan's: with NaN, the last NaN in row-major order;
/// otherwise the first maximum of the earliest row that holds the window's maximum, which is
/// the first in row-major order.
fn max_pool_separable(
    width: usize,
    (rows, cols, stem): (&[Range], &[Range], Option<&StemColumns>),
    scratch: &mut SeparableScratch,
    xp: &[f32],
    (o, idx): (&mut [f32], &mut [u32]),
) {
    let ow = cols.len();
    let height = xp.len() / width;
    let SeparableScratch { hv, hi, even, odd } = scratch;
    // Every row's maxima are written before they are read.
    hv.resize(height * ow, 0.0);
    hi.resize(height * ow, 0);
    let isa = crate::isa::active();
    crate::isa::vectorized(
        isa,
        #[inline(always)]
        || {
            let maxima = hv.chunks_exact_mut(ow).zip(hi.chunks_exact_mut(ow));
            for (row, (hv, hi)) in xp.chunks_exact(width).zip(maxima) {
                row_maxima(row, (cols, stem), (&mut *even, &mut *odd), hv, hi);
            }
            let outputs = o.chunks_exact_mut(ow).zip(idx.chunks_exact_mut(ow));
            for ((o, idx), r) in outputs.zip(rows) {
                o.copy_from_slice(&hv[r.start * ow..][..ow]);
                let base = (r.start * width) as u32;
                for (d, &c) in idx.iter_mut().zip(&hi[r.start * ow..][..ow]) {
                    *d = base + c;
                }
                for iy in r.start + 1..r.end {
                    let (v, c) = (&hv[iy * ow..][..ow], &hi[iy * ow..][..ow]);
                    let base = (iy * width) as u32;
                    for ((o, idx), (&v, &c)) in
                        o.iter_mut().zip(idx.iter_mut()).zip(v.iter().zip(c))
                    {
                        let take = wins(v, *o);
                        *o = if take { v } else { *o };
                        *idx = if take { base + c } else { *idx };
                    }
                }
            }
        },
    )
}

/// The buffers of [`max_pool_separable`], reused from plane to plane by a parallel task: each
/// input row's window maxima and their columns, and (the stem's path) a row's even and odd
/// columns.
#[derive(Default)]
struct SeparableScratch {
    hv: Vec<f32>,
    hi: Vec<u32>,
    even: Vec<f32>,
    odd: Vec<f32>,
}

/// Columns of a 3-wide window at stride 2 with padding 1 (ResNet's stem pool): output column
/// `ox` reads input columns `2ox - 1, 2ox, 2ox + 1`, the interior ones all three.
struct StemColumns {
    /// Output columns whose window is whole.
    interior: std::ops::Range<usize>,
}

impl StemColumns {
    fn of(width: usize, cols: &[Range]) -> Option<Self> {
        let stem = cols.iter().enumerate().all(|(ox, c)| {
            c.end == (2 * ox + 2).min(width) && c.start == (2 * ox).saturating_sub(1)
        });
        let last_whole = |ox: usize| 2 * ox + 1 < width;
        let end = (1..cols.len())
            .rev()
            .find(|&ox| last_whole(ox))
            .map_or(1, |ox| ox + 1);
        (stem && cols.len() > 2).then_some(StemColumns { interior: 1..end })
    }
}

/// Per output column of one input row, the maximum over its window's columns `cols` and the
/// column it is at (the scan's first maximum, or last NaN).
#[inline(always)]
fn row_maxima(
    row: &[f32],
    (cols, stem): (&[Range], Option<&StemColumns>),
    (even, odd): (&mut Vec<f32>, &mut Vec<f32>),
    hv: &mut [f32],
    hi: &mut [u32],
) {
    let scan = |c: &Range| {
        let (mut best, mut at) = (row[c.start], c.start);
        for (ix, &v) in row.iter().enumerate().take(c.end).skip(c.start + 1) {
            let take = wins(v, best);
            best = if take { v } else { best };
            at = if take { ix } else { at };
        }
        (best, at as u32)
    };
    let Some(stem) = stem else {
        for ((h, i), c) in hv.iter_mut().zip(hi.iter_mut()).zip(cols) {
            (*h, *i) = scan(c);
        }
        return;
    };
    // Interior windows from the even and odd columns: left = odd[ox - 1], centre = even[ox],
    // right = odd[ox], as contiguous runs (the loop vectorises).
    even.clear();
    odd.clear();
    for pair in row.chunks_exact(2) {
        even.push(pair[0]);
        odd.push(pair[1]);
    }
    let inner = stem.interior.clone();
    let lefts = &odd[inner.start - 1..inner.end - 1];
    let (centres, rights) = (&even[inner.clone()], &odd[inner.clone()]);
    let outs = hv[inner.clone()]
        .iter_mut()
        .zip(hi[inner.clone()].iter_mut());
    for (ox, ((h, i), ((&l, &c), &r))) in inner
        .clone()
        .zip(outs.zip(lefts.iter().zip(centres).zip(rights)))
    {
        let left = (2 * ox - 1) as u32;
        let take_c = wins(c, l);
        let (best, at) = if take_c { (c, left + 1) } else { (l, left) };
        let take_r = wins(r, best);
        *h = if take_r { r } else { best };
        *i = if take_r { left + 2 } else { at };
    }
    for ox in (0..inner.start).chain(inner.end..cols.len()) {
        (hv[ox], hi[ox]) = scan(&cols[ox]);
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

    /// `len` pool inputs drawn from `seed`: about 1 in 64 NaN, 1 in 64 minus infinity, the
    /// rest among `levels` small integers (ties everywhere).
    fn tied(len: usize, seed: usize, levels: u64) -> Vec<f32> {
        (0..len)
            .map(
                |i| match ((i + seed) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    h => (h % levels) as f32,
                },
            )
            .collect()
    }

    /// ResNet's stem pool (3x3, stride 2, padding 1, the even/odd-column path) and a stride-1
    /// 3x3 pool against the definition: the first maximal input in row-major order, the last
    /// NaN where there is one; ties, NaNs and minus infinity included.
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
            // Zeros and ones: many ties for the first maximum.
            let x = tied(s.input_len(), 0, 2);
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

    /// Every window shape (the stem's 3x3 at stride 2 on even, odd and tiny widths, and others)
    /// through the two-scan path gives the row-major scan's values and positions, with ties,
    /// NaNs and minus infinity.
    #[test]
    fn the_two_scans_equal_the_row_major_scan() {
        let shapes = [
            // (height, width, kernel, stride, padding)
            (9, 8, 3, 2, 1),
            (8, 9, 3, 2, 1),
            (7, 11, 3, 2, 1),
            (1, 1, 3, 2, 1),
            (2, 3, 3, 2, 1),
            (3, 2, 3, 2, 1),
            (6, 7, 3, 1, 1),
            (8, 8, 2, 1, 0),
            (9, 10, 5, 2, 2),
            (7, 7, 3, 3, 1),
            (5, 6, 2, 2, 1),
        ];
        for (case, &(height, width, k, stride, pad)) in shapes.iter().enumerate() {
            let s = Pool2dShape {
                batch: 2,
                channels: 2,
                height,
                width,
                kernel: [k, k],
                stride: [stride, stride],
                padding: [pad, pad],
            };
            let x = tied(s.input_len(), 31 * case, 3);
            let (mut out, mut idx) = (vec![0.0; s.output_len()], vec![0u32; s.output_len()]);
            max_pool2d_forward(&s, &x, &mut out, &mut idx);
            let (plane_in, plane_out) = (height * width, s.out_height() * s.out_width());
            for p in 0..s.batch * s.channels {
                let (mut o, mut i) = (vec![0.0; plane_out], vec![0u32; plane_out]);
                max_pool_plane(&s, &x[p * plane_in..][..plane_in], &mut o, &mut i);
                assert_eq!(i, idx[p * plane_out..][..plane_out], "{s:?} plane {p}");
                let got = &out[p * plane_out..][..plane_out];
                let same = |(a, b): (&f32, &f32)| a == b || (a.is_nan() && b.is_nan());
                assert!(o.iter().zip(got).all(same), "{s:?} plane {p}");
            }
        }
    }
}
