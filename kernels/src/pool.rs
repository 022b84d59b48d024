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
    out.par_chunks_mut(plane_out)
        .zip(indices.par_chunks_mut(plane_out))
        .zip(x.par_chunks(plane_in))
        .for_each(|((o, idx), xp)| {
            if halving {
                max_pool_2x2(s.width, xp, ow, o, idx);
            } else {
                max_pool_plane(s, xp, o, idx);
            }
        });
}

/// Whether `v` replaces `best` in a max scan (larger, or NaN).
#[inline(always)]
fn wins(v: f32, best: f32) -> bool {
    (v > best) | v.is_nan()
}

/// The common 2x2 window at stride 2 without padding, as a tournament without branches (so it
/// vectorizes): the top pair, the bottom pair, then their winners. Each comparison keeps the
/// earlier input on a tie, and top inputs come before bottom ones, so the winner is the first
/// maximal input in row-major order, as in the general scan.
fn max_pool_2x2(width: usize, xp: &[f32], ow: usize, o: &mut [f32], idx: &mut [u32]) {
    for ((orow, irow), oy) in o
        .chunks_exact_mut(ow)
        .zip(idx.chunks_exact_mut(ow))
        .zip(0..)
    {
        let top = 2 * oy * width;
        let (r0, r1) = (&xp[top..top + width], &xp[top + width..top + 2 * width]);
        for (ox, (ov, iv)) in orow.iter_mut().zip(irow.iter_mut()).enumerate() {
            let c = 2 * ox;
            let (a, b, cc, d) = (r0[c], r0[c + 1], r1[c], r1[c + 1]);
            let top_right = wins(b, a);
            let upper = if top_right { b } else { a };
            let upper_at = c + top_right as usize;
            let bottom_right = wins(d, cc);
            let lower = if bottom_right { d } else { cc };
            let lower_at = width + c + bottom_right as usize;
            let take_lower = wins(lower, upper);
            *ov = if take_lower { lower } else { upper };
            *iv = (top + if take_lower { lower_at } else { upper_at }) as u32;
        }
    }
}

/// Any window, stride and padding: windows clipped to the plane.
fn max_pool_plane(s: &Pool2dShape, xp: &[f32], o: &mut [f32], idx: &mut [u32]) {
    let (oh, ow) = (s.out_height(), s.out_width());
    for oy in 0..oh {
        let rows = window(oy, s.stride[0], s.kernel[0], s.padding[0], s.height);
        for ox in 0..ow {
            let cols = window(ox, s.stride[1], s.kernel[1], s.padding[1], s.width);
            let mut best = f32::NEG_INFINITY;
            let mut best_at = rows.start * s.width + cols.start;
            for iy in rows.clone() {
                let row = &xp[iy * s.width..(iy + 1) * s.width];
                for ix in cols.clone() {
                    let v = row[ix];
                    let take = wins(v, best);
                    best = if take { v } else { best };
                    best_at = if take { iy * s.width + ix } else { best_at };
                }
            }
            o[oy * ow + ox] = best;
            idx[oy * ow + ox] = best_at as u32;
        }
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
}
