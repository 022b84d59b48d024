//! Integer inference for SimpleCNN: int8 weights per output channel, 7-bit activations per
//! tensor, `u8 x i8 -> i32` GEMMs ([`kiln_kernels::int8`]) for both convolutions and both
//! linear layers.
//!
//! Activations flow NHWC between layers (a convolution's GEMM rows are output positions, its
//! columns output channels), so weights are permuted once at build time: convolutions to
//! `[out, kh, kw, in]`, `fc1`'s inputs from Burn's `(c, h, w)` flattening to `(h, w, c)`.
//! Each GEMM's epilogue applies `scale_in * scale_w[o] * (acc - zero_in * sum_k w[o, k]) +
//! bias[o]`, the ReLU, and, with static activations, the next layer's quantization, so a
//! layer's output never exists in float. The 2x2 max-pools run on the codes (quantization is
//! monotone, so pooling codes equals quantizing the pooled values).
//!
//! Activation scales are either [`Activations::Dynamic`] (each layer's input range measured
//! per batch) or [`Activations::Static`] (ranges recorded by [`Int8SimpleCnn::calibrate`] and
//! stored in the quantized file).

use burn::tensor::{Tensor, TensorData};
use kiln_kernels::int8::{
    ActQuant, Epilogue, PackedWeights, gemm_u8i8, gemm_u8i8_rows, max_pool_2x2,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::scheme::{Granularity, QuantBits, QuantScheme};
use super::weights::QuantizedTensor;
use crate::SimpleCnn;

/// SimpleCNN's image side, channels and hidden sizes, as the float model has them.
const SIDE: usize = 28;

/// How activations get their scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Activations {
    /// Each quantized layer's input range is measured on every batch.
    Dynamic,
    /// Fixed ranges `[lo, hi]` of each quantized layer's input (image, conv2, fc1, fc2),
    /// from calibration batches.
    Static {
        /// One range per quantized layer, in order.
        ranges: Vec<[f32; 2]>,
        /// Calibration batches the ranges came from.
        batches: usize,
    },
}

impl Activations {
    /// Static activations from min-max calibration: `run(batch, seen)` runs a batch with
    /// dynamic activations and tells `seen(point, quant)` each quantization point's map; the
    /// ranges they cover, widened over all `batches`, become the fixed ones.
    pub(super) fn calibrated(
        batches: impl IntoIterator<Item = Tensor<4>>,
        mut run: impl FnMut(Tensor<4>, &mut dyn FnMut(usize, ActQuant)),
    ) -> Activations {
        let mut ranges: Vec<[f32; 2]> = Vec::new();
        let mut count = 0;
        for images in batches {
            run(images, &mut |point, q| {
                if ranges.len() <= point {
                    ranges.resize(point + 1, [0.0, 0.0]);
                }
                let [lo, hi] = q.range();
                ranges[point] = [ranges[point][0].min(lo), ranges[point][1].max(hi)];
            });
            count += 1;
        }
        Activations::Static {
            ranges,
            batches: count,
        }
    }

    /// The quantization of point `point`: its fixed range, or measured on `values`.
    pub(super) fn quant(&self, point: usize, values: &[f32]) -> ActQuant {
        match self {
            Activations::Static { ranges, .. } => {
                let [lo, hi] = ranges.get(point).copied().unwrap_or([0.0, 0.0]);
                ActQuant::from_range(lo, hi)
            }
            Activations::Dynamic => ActQuant::of(values),
        }
    }

    /// The codes of quantization point `point` (of shape `hwc`): with static activations
    /// `codes(q)` writes them in the epilogue; dynamic ones quantize the `floats()` by their
    /// range.
    pub(super) fn codes(
        &self,
        point: usize,
        hwc: [usize; 3],
        codes: impl FnOnce(ActQuant) -> Vec<u8>,
        floats: impl FnOnce() -> Vec<f32>,
    ) -> Codes {
        match self {
            Activations::Static { .. } => {
                let q = self.quant(point, &[]);
                Codes {
                    data: codes(q),
                    q,
                    hwc,
                }
            }
            Activations::Dynamic => {
                let values = floats();
                let q = ActQuant::of(&values);
                let data = values.iter().map(|&v| q.code(v)).collect();
                Codes { data, q, hwc }
            }
        }
    }

    /// `dynamic` or `static`.
    pub fn name(&self) -> &'static str {
        match self {
            Activations::Dynamic => "dynamic",
            Activations::Static { .. } => "static",
        }
    }
}

/// A layer's epilogue map for one input quantization: per channel, what an accumulator is
/// multiplied by and what is added after.
pub(super) struct Affine {
    mult: Vec<f32>,
    offset: Vec<f32>,
}

impl Affine {
    /// The epilogue of this map, with or without a ReLU.
    pub(super) fn epilogue(&self, relu: bool) -> Epilogue<'_> {
        Epilogue {
            mult: &self.mult,
            offset: &self.offset,
            relu,
        }
    }
}

/// One int8 layer: packed weights, their per-channel scales, the float bias.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) w: PackedWeights,
    scales: Vec<f32>,
    bias: Vec<f32>,
}

impl Layer {
    /// `weights` is `[out, k]` row-major; per-channel symmetric int8 unless `per_tensor`.
    pub(super) fn new(weights: &[f32], out: usize, bias: Vec<f32>, per_tensor: bool) -> Layer {
        let k = weights.len() / out;
        let granularity = if per_tensor {
            Granularity::Tensor
        } else {
            Granularity::Channel
        };
        let scheme = QuantScheme {
            bits: QuantBits::Int8,
            granularity,
        };
        let q = QuantizedTensor::quantize(weights, &[out, k], scheme);
        let scales = if per_tensor {
            vec![q.scales[0]; out]
        } else {
            q.scales
        };
        Layer {
            w: PackedWeights::new(&q.values, out, k),
            scales,
            bias,
        }
    }

    /// The per-channel multipliers and offsets of the epilogue for inputs quantized by `q`.
    pub(super) fn affine(&self, q: ActQuant) -> Affine {
        let sums = self.w.col_sums();
        let (mult, offset) = (0..self.w.n())
            .map(|o| {
                let m = q.scale * self.scales[o];
                (m, self.bias[o] - m * (q.zero_point * sums[o]) as f32)
            })
            .unzip();
        Affine { mult, offset }
    }

    /// Runs the GEMM on `a` (`rows x k` codes quantized by `q`), ReLU'd when `relu`; `put`
    /// turns each block of accumulator rows into `T`s with the layer's [`Epilogue`] (the next
    /// layer's codes, or the floats themselves).
    pub(super) fn apply<T: Copy + Default + Send>(
        &self,
        a: &[u8],
        rows: usize,
        q: ActQuant,
        relu: bool,
        put: impl Fn(&Epilogue, &[i32], usize, &mut [T]) + Sync,
    ) -> Vec<T> {
        let (n, n16) = (self.w.n(), self.w.n_padded());
        let (k, k4) = (self.w.k(), self.w.k_padded());
        let padded;
        let a = if a.len() == rows * k4 {
            a
        } else {
            padded = pad_rows(a, k, k4);
            &padded[..]
        };
        let affine = self.affine(q);
        let epilogue = affine.epilogue(relu);
        let mut out = vec![T::default(); rows * n];
        gemm_u8i8(a, rows, &self.w, &mut out, n, |c, out| {
            put(&epilogue, c, n16, out)
        });
        out
    }

    /// This 3x3 convolution (padding 1, stride 1) of the NHWC codes `x`, with bias and ReLU,
    /// max-pooled 2x2: one task per image, whose rows of A, accumulators and pooled rows stay
    /// in the thread's cache. The pool runs on the accumulators (the epilogue is monotone), so
    /// `put` sees a quarter of the outputs; output rows a pool drops are not computed.
    fn conv_pool<T: Copy + Default + Send>(
        &self,
        x: &Codes,
        batch: usize,
        put: impl Fn(&Epilogue, &[i32], usize, &mut [T]) + Sync,
    ) -> Vec<T> {
        let [h, w, c] = x.hwc;
        let (oh, ow, n, n16) = (h / 2, w / 2, self.w.n(), self.w.n_padded());
        let affine = self.affine(x.q);
        let epilogue = affine.epilogue(true);
        let mut out = vec![T::default(); batch * oh * ow * n];
        if out.is_empty() {
            return out;
        }
        let zero = x.q.zero_point as u8;
        let image_out = oh * ow * n;
        out.par_chunks_mut(image_out).enumerate().for_each_init(
            ConvScratch::default,
            |s, (b, out)| {
                let image = &x.data[b * h * w * c..(b + 1) * h * w * c];
                let rows = 2 * oh * w;
                let geometry = Geometry::SAME_3X3;
                im2row(
                    image,
                    x.hwc,
                    geometry,
                    (zero, self.w.k_padded()),
                    0..rows,
                    &mut s.a,
                );
                gemm_u8i8_rows(&s.a, rows, &self.w, &mut s.c);
                s.pooled.resize(ow * n16, 0);
                for (py, out_row) in out.chunks_exact_mut(ow * n).enumerate() {
                    let pair = &s.c[2 * py * w * n16..(2 * py + 2) * w * n16];
                    max_pool_2x2(pair, w, n16, &mut s.pooled);
                    put(&epilogue, &s.pooled, n16, out_row);
                }
            },
        );
        out
    }
}

/// A convolution task's buffers, kept per thread: rows of A, accumulators, a pooled row.
#[derive(Default)]
struct ConvScratch {
    a: Vec<u8>,
    c: Vec<i32>,
    pooled: Vec<i32>,
}

/// SimpleCNN with integer convolutions and linear layers.
#[derive(Debug, Clone)]
pub struct Int8SimpleCnn {
    conv1: Layer,
    conv2: Layer,
    fc1: Layer,
    fc2: Layer,
    activations: Activations,
}

/// A float tensor's values, row-major.
pub(super) fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

impl Int8SimpleCnn {
    /// The integer model of `model`'s weights quantized under `scheme` (int8 per output
    /// channel, or per tensor: a quantized file's own integers, exactly), or `None` for the
    /// schemes the integer path does not run (int4, block-wise).
    pub fn new(
        model: &SimpleCnn,
        scheme: QuantScheme,
        activations: Activations,
    ) -> Option<Int8SimpleCnn> {
        let per_tensor = match (scheme.bits, scheme.granularity) {
            (QuantBits::Int8, Granularity::Tensor) => true,
            (QuantBits::Int8, Granularity::Channel) => false,
            _ => return None,
        };
        let conv = |c: &burn::nn::conv::Conv2d| {
            let [o, i, kh, kw] = c.weight.dims();
            let w = floats(c.weight.val());
            // [o, i, kh, kw] -> [o, kh, kw, i]: the NHWC im2row order.
            let mut p = vec![0.0; w.len()];
            for (idx, v) in w.iter().enumerate() {
                let (oo, rest) = (idx / (i * kh * kw), idx % (i * kh * kw));
                let (ii, y, x) = (rest / (kh * kw), rest / kw % kh, rest % kw);
                p[((oo * kh + y) * kw + x) * i + ii] = *v;
            }
            let bias = c
                .bias
                .as_ref()
                .map(|b| floats(b.val()))
                .unwrap_or(vec![0.0; o]);
            Layer::new(&p, o, bias, per_tensor)
        };
        let linear = |l: &burn::nn::Linear, nchw: Option<[usize; 3]>| {
            let [i, o] = l.weight.dims();
            let w = floats(l.weight.val().transpose()); // [o, i]
            let w = match nchw {
                Some(chw) => to_hwc_inputs(&w, o, chw),
                None => w,
            };
            let bias = l
                .bias
                .as_ref()
                .map(|b| floats(b.val()))
                .unwrap_or(vec![0.0; o]);
            debug_assert_eq!(w.len(), i * o);
            Layer::new(&w, o, bias, per_tensor)
        };
        let c2 = model.conv2.weight.dims()[0];
        Some(Int8SimpleCnn {
            conv1: conv(&model.conv1),
            conv2: conv(&model.conv2),
            fc1: linear(&model.fc1, Some([c2, SIDE / 4, SIDE / 4])),
            fc2: linear(&model.fc2, None),
            activations,
        })
    }

    /// How this model quantizes its activations.
    pub fn activations(&self) -> &Activations {
        &self.activations
    }

    /// Outputs per image.
    pub fn classes(&self) -> usize {
        self.fc2.w.n()
    }

    /// Logits `[batch, classes]` (row-major) for `batch` images of 1 x 28 x 28.
    ///
    /// # Panics
    /// When `images.len() != batch * 784` (callers check shapes first).
    pub fn forward(&self, images: &[f32], batch: usize) -> Vec<f32> {
        self.run(images, batch, &mut |_, _| {})
    }

    /// [`Self::forward`] on a `[batch, 1, 28, 28]` tensor: logits `[batch, classes]` on the
    /// same device.
    pub fn forward_tensor(&self, images: Tensor<4>) -> Tensor<2> {
        let (batch, device) = (images.dims()[0], images.device());
        let logits = self.forward(&floats(images), batch);
        Tensor::from_data(TensorData::new(logits, [batch, self.classes()]), &device)
    }

    /// Records the input range of every quantized layer over `batches` (`[batch, 1, 28, 28]`
    /// images), run with dynamic activations, then fixes those ranges: static activations
    /// (min-max calibration).
    pub fn calibrate(&mut self, batches: impl IntoIterator<Item = Tensor<4>>) {
        self.activations = Activations::Dynamic;
        self.activations = Activations::calibrated(batches, |images, seen| {
            let batch = images.dims()[0];
            self.run(&floats(images), batch, seen);
        });
    }

    /// The forward pass; `seen(layer, quant)` is told each layer's input quantization.
    fn run(&self, images: &[f32], batch: usize, seen: &mut dyn FnMut(usize, ActQuant)) -> Vec<f32> {
        assert_eq!(
            images.len(),
            batch * SIDE * SIDE,
            "images are not {batch} x 1 x 28 x 28"
        );
        let q0 = self.activations.quant(0, images);
        seen(0, q0);
        let mut x = Codes {
            data: images.iter().map(|&v| q0.code(v)).collect(),
            q: q0,
            hwc: [SIDE, SIDE, 1],
        };
        for (i, conv) in [&self.conv1, &self.conv2].into_iter().enumerate() {
            let [h, w, _] = x.hwc;
            let hwc = [h / 2, w / 2, conv.w.n()];
            x = self.activations.codes(
                i + 1,
                hwc,
                |q| conv.conv_pool(&x, batch, |e, acc, s, out| e.codes(acc, s, None, q, out)),
                || conv.conv_pool(&x, batch, |e, acc, s, out| e.floats(acc, s, None, out)),
            );
            seen(i + 1, x.q);
        }
        let (fc1, q) = (&self.fc1, x.q);
        let h = self.activations.codes(
            3,
            [1, 1, fc1.w.n()],
            |next| {
                fc1.apply(&x.data, batch, q, true, |e, acc, s, out| {
                    e.codes(acc, s, None, next, out)
                })
            },
            || {
                fc1.apply(&x.data, batch, q, true, |e, acc, s, out| {
                    e.floats(acc, s, None, out)
                })
            },
        );
        seen(3, h.q);
        self.fc2
            .apply(&h.data, batch, h.q, false, |e, acc, s, out| {
                e.floats(acc, s, None, out)
            })
    }
}

/// Activation codes of a batch, NHWC, with their quantization.
pub(super) struct Codes {
    pub(super) data: Vec<u8>,
    pub(super) q: ActQuant,
    pub(super) hwc: [usize; 3],
}

/// Rows of length `k` copied into rows of length `k4` (zeros after).
pub(super) fn pad_rows(a: &[u8], k: usize, k4: usize) -> Vec<u8> {
    let mut out = vec![0u8; a.len() / k * k4];
    for (src, dst) in a.chunks_exact(k).zip(out.chunks_exact_mut(k4)) {
        dst[..k].copy_from_slice(src);
    }
    out
}

/// `[o, (c, h, w)]` weights with inputs reordered to `(h, w, c)`.
fn to_hwc_inputs(w: &[f32], out: usize, [c, h, wd]: [usize; 3]) -> Vec<f32> {
    let k = c * h * wd;
    let mut p = vec![0.0; w.len()];
    for o in 0..out {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..wd {
                    p[o * k + (y * wd + x) * c + ci] = w[o * k + (ci * h + y) * wd + x];
                }
            }
        }
    }
    p
}

/// A square convolution's kernel side, stride and (symmetric) padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl Geometry {
    /// 3x3, stride 1, padding 1: the size-keeping convolution.
    pub(super) const SAME_3X3: Geometry = Geometry {
        k: 3,
        stride: 1,
        pad: 1,
    };

    /// The output side for an input side `n` (callers check `n + 2 * pad >= k`).
    pub(super) fn out(&self, n: usize) -> usize {
        (n + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// The rows of output positions `positions` (row-major over the output) of a convolution of
/// geometry `g` over one NHWC image of codes: `(ky, kx, c)` order, padding positions (and the
/// row's tail up to `k4`, whose weights are 0) holding the zero point; into `a`, every byte
/// written (a buffer reused at the same size is not cleared first). Each kernel row's
/// positions are one contiguous copy, of a fixed size for the usual kernel and channel
/// counts.
pub(super) fn im2row(
    image: &[u8],
    hwc: [usize; 3],
    g: Geometry,
    (zero, k4): (u8, usize),
    positions: std::ops::Range<usize>,
    a: &mut Vec<u8>,
) {
    a.resize(positions.len() * k4, 0);
    let at = (zero, k4);
    match (g.k, hwc[2]) {
        (3, 1) => rows_of::<3, 1>(image, hwc, g, at, positions.start, a),
        (3, 32) => rows_of::<3, 32>(image, hwc, g, at, positions.start, a),
        (3, 64) => rows_of::<3, 64>(image, hwc, g, at, positions.start, a),
        (7, 3) => rows_of::<7, 3>(image, hwc, g, at, positions.start, a),
        _ => rows_of::<0, 0>(image, hwc, g, at, positions.start, a),
    }
}

/// [`im2row`]'s copies from output position `first` on; `K` and `C` are the kernel side and
/// channel count when not 0 (fixed-size copies).
#[inline(always)]
fn rows_of<const K: usize, const C: usize>(
    image: &[u8],
    [h, w, c]: [usize; 3],
    g: Geometry,
    (zero, k4): (u8, usize),
    first: usize,
    a: &mut [u8],
) {
    let (k, c) = (if K == 0 { g.k } else { K }, if C == 0 { c } else { C });
    let ow = g.out(w);
    for (i, dst) in a.chunks_exact_mut(k4).enumerate() {
        let (oy, ox) = ((first + i) / ow, (first + i) % ow);
        // Source columns x0..x1 of the window starting at `left` (padding before x0).
        let left = (ox * g.stride) as isize - g.pad as isize;
        let (x0, x1) = (
            left.max(0) as usize,
            ((left + k as isize).max(0) as usize).min(w),
        );
        let skip = (x0 as isize - left).min(k as isize) as usize;
        let taken = x1.saturating_sub(x0);
        for ky in 0..k {
            let row = &mut dst[ky * k * c..(ky + 1) * k * c];
            let iy = (oy * g.stride + ky).wrapping_sub(g.pad);
            if iy >= h || taken == 0 {
                row.fill(zero);
                continue;
            }
            let src = &image[(iy * w + x0) * c..(iy * w + x1) * c];
            if taken == k {
                row.copy_from_slice(&src[..k * c]);
            } else {
                row[..skip * c].fill(zero);
                row[skip * c..(skip + taken) * c].copy_from_slice(src);
                row[(skip + taken) * c..].fill(zero);
            }
        }
        dst[k * k * c..].fill(zero);
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::{SimpleCnnConfig, load_weights};

    /// A float32 `.npy` file's values (version 1 header, little-endian).
    fn npy(path: &str) -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        bytes[10 + header..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn fixture() -> (SimpleCnn, Vec<f32>) {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/simple_cnn");
        let device = Device::flex();
        let mut model = SimpleCnnConfig::new().init(&device, 0);
        let _ = load_weights(
            &mut model,
            format!("{root}/simple_cnn.safetensors").as_ref(),
        )
        .unwrap();
        (model, npy(&format!("{root}/input.npy")))
    }

    /// Max |a - b| over max |b|, NaN failing (as infinity), and how many rows share their argmax.
    fn compare(a: &[f32], b: &[f32], classes: usize) -> (f32, usize) {
        let top = |r: &[f32]| (0..r.len()).fold(0, |m, i| if r[i] > r[m] { i } else { m });
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(
                0.0f32,
                |m, d| {
                    if d.is_nan() { f32::INFINITY } else { m.max(d) }
                },
            );
        let agree = a
            .chunks(classes)
            .zip(b.chunks(classes))
            .filter(|(x, y)| top(x) == top(y))
            .count();
        (diff / scale, agree)
    }

    /// Every geometry ResNet and SimpleCNN use (and a generic one) against the definition:
    /// row `(oy, ox)`, column `(ky, kx, c)` holds the input at `(oy * s + ky - p, ox * s + kx
    /// - p, c)`, or the zero point outside the image and in the row's tail.
    #[test]
    fn im2row_rows_are_the_convolution_windows() {
        for (k, stride, pad, [h, w, c]) in [
            (3, 1, 1, [6, 5, 1]),
            (3, 1, 1, [4, 4, 32]),
            (7, 2, 3, [9, 11, 3]),
            (3, 2, 1, [7, 6, 64]),
            (1, 2, 0, [5, 6, 2]),
            (5, 3, 2, [8, 7, 5]),
        ] {
            let g = Geometry { k, stride, pad };
            let image: Vec<u8> = (0..h * w * c).map(|i| (i * 7 % 120 + 1) as u8).collect();
            let (zero, k4) = (99u8, (k * k * c).div_ceil(4) * 4);
            let (oh, ow) = (g.out(h), g.out(w));
            // A buffer of the right size holding garbage: every byte must be written.
            let mut a = vec![7u8; oh * ow * k4];
            im2row(&image, [h, w, c], g, (zero, k4), 0..oh * ow, &mut a);
            for (pos, row) in a.chunks(k4).enumerate() {
                let (oy, ox) = (pos / ow, pos % ow);
                for (col, &v) in row.iter().enumerate() {
                    let (ky, kx, ch) = (col / (k * c), col / c % k, col % c);
                    let (iy, ix) = (
                        (oy * stride + ky) as isize - pad as isize,
                        (ox * stride + kx) as isize - pad as isize,
                    );
                    let inside = col < k * k * c
                        && iy >= 0
                        && ix >= 0
                        && (iy as usize) < h
                        && (ix as usize) < w;
                    let want = match inside {
                        true => image[((iy as usize) * w + ix as usize) * c + ch],
                        false => zero,
                    };
                    assert_eq!(
                        v, want,
                        "k{k} s{stride} p{pad} {h}x{w}x{c}: row {pos} col {col}"
                    );
                }
            }
        }
    }

    #[test]
    fn integer_logits_follow_the_float_model() {
        let (model, images) = fixture();
        let batch = images.len() / (SIDE * SIDE);
        let x = Tensor::<4>::from_data(
            TensorData::new(images.clone(), [batch, 1, SIDE, SIDE]),
            &Device::flex(),
        );
        let float = floats(model.forward(x.clone()));
        let scheme = QuantScheme {
            bits: QuantBits::Int8,
            granularity: Granularity::Channel,
        };
        let mut int8 = Int8SimpleCnn::new(&model, scheme, Activations::Dynamic).unwrap();
        let dynamic = int8.forward(&images, batch);
        let (rel, agree) = compare(&dynamic, &float, int8.classes());
        assert!(
            rel < 0.05 && agree >= batch - 1,
            "dynamic: {rel} relative, {agree}/{batch} argmax"
        );
        int8.calibrate(x.clone().chunk(4, 0));
        assert!(matches!(
            int8.activations(),
            Activations::Static { batches: 4, .. }
        ));
        let fixed = int8.forward(&images, batch);
        let (rel, agree) = compare(&fixed, &float, int8.classes());
        assert!(
            rel < 0.05 && agree >= batch - 1,
            "static: {rel} relative, {agree}/{batch} argmax"
        );
        // One image alone gives its row of the batch (static scales do not depend on the batch).
        let one = int8.forward(&images[5 * SIDE * SIDE..6 * SIDE * SIDE], 1);
        assert_eq!(one, fixed[5 * 10..6 * 10]);
        // The tensor entry point runs the same arithmetic.
        assert_eq!(floats(int8.forward_tensor(x)), fixed);
        // int4 and block-wise weights are not run on the integer path.
        let int4 = QuantScheme {
            bits: QuantBits::Int4,
            granularity: Granularity::Channel,
        };
        assert!(Int8SimpleCnn::new(&model, int4, Activations::Dynamic).is_none());
    }
}
