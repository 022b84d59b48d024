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
/// the first maximal input in its plane. A NaN in a window wins, as in PyTorch.
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
    out.par_chunks_mut(plane_out)
        .zip(indices.par_chunks_mut(plane_out))
        .zip(x.par_chunks(plane_in))
        .for_each(|((o, idx), xp)| {
            for oy in 0..oh {
                let rows = window(oy, s.stride[0], s.kernel[0], s.padding[0], s.height);
                for ox in 0..ow {
                    let cols = window(ox, s.stride[1], s.kernel[1], s.padding[1], s.width);
                    let mut best = f32::NEG_INFINITY;
                    let mut best_at = rows.start * s.width + cols.start;
                    'window: for iy in rows.clone() {
                        let row = &xp[iy * s.width..(iy + 1) * s.width];
                        for ix in cols.clone() {
                            let v = row[ix];
                            if v > best || v.is_nan() {
                                best = v;
                                best_at = iy * s.width + ix;
                                if v.is_nan() {
                                    break 'window;
                                }
                            }
                        }
                    }
                    o[oy * ow + ox] = best;
                    idx[oy * ow + ox] = best_at as u32;
                }
            }
        });
}

/// Max-pool backward: `grad_x` (overwritten) receives each output gradient at its recorded
/// input position.
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
            gx.fill(0.0);
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
        let mut gx = [f32::NAN; 16];
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
    }
}
