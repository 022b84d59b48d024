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
use kiln_kernels::int8::{ActQuant, PackedWeights, gemm_u8i8};
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
    /// `dynamic` or `static`.
    pub fn name(&self) -> &'static str {
        match self {
            Activations::Dynamic => "dynamic",
            Activations::Static { .. } => "static",
        }
    }
}

/// One int8 layer: packed weights, their per-channel scales, the float bias.
#[derive(Debug, Clone)]
struct Layer {
    w: PackedWeights,
    scales: Vec<f32>,
    bias: Vec<f32>,
}

impl Layer {
    /// `weights` is `[out, k]` row-major; per-channel symmetric int8 unless `per_tensor`.
    fn new(weights: &[f32], out: usize, bias: Vec<f32>, per_tensor: bool) -> Layer {
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
    fn affine(&self, q: ActQuant) -> (Vec<f32>, Vec<f32>) {
        let sums = self.w.col_sums();
        (0..self.w.n())
            .map(|o| {
                let m = q.scale * self.scales[o];
                (m, self.bias[o] - m * (q.zero_point * sums[o]) as f32)
            })
            .unzip()
    }

    /// Runs the GEMM on `a` (`rows x k` codes quantized by `q`), ReLU'd when `relu`; the
    /// epilogue turns each output value into a `T` with `put` (the next layer's code, or the
    /// float itself).
    fn apply<T: Copy + Default + Send>(
        &self,
        a: &[u8],
        rows: usize,
        q: ActQuant,
        relu: bool,
        put: impl Fn(f32) -> T + Sync,
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
        let (mult, offset) = self.affine(q);
        let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
        let mut out = vec![T::default(); rows * n];
        gemm_u8i8(a, rows, &self.w, &mut out, n, |c, out| {
            for (crow, orow) in c.chunks_exact(n16).zip(out.chunks_exact_mut(n)) {
                let values = crow.iter().zip(&mult).zip(&offset);
                for (v, ((&acc, &m), &b)) in orow.iter_mut().zip(values) {
                    *v = put((m * acc as f32 + b).max(floor));
                }
            }
        });
        out
    }
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
fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
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
        let mut ranges = [[0.0f32; 2]; 4];
        let mut count = 0;
        for images in batches {
            let batch = images.dims()[0];
            self.run(&floats(images), batch, &mut |layer, q: ActQuant| {
                let lo = -q.scale * q.zero_point as f32;
                let hi = q.scale * (kiln_kernels::int8::ACT_MAX as i32 - q.zero_point) as f32;
                ranges[layer][0] = ranges[layer][0].min(lo);
                ranges[layer][1] = ranges[layer][1].max(hi);
            });
            count += 1;
        }
        self.activations = Activations::Static {
            ranges: ranges.to_vec(),
            batches: count,
        };
    }

    /// The quantization of layer `layer`'s input: fixed, or measured on `values`.
    fn input_quant(&self, layer: usize, values: &[f32]) -> ActQuant {
        match &self.activations {
            Activations::Static { ranges, .. } => {
                let [lo, hi] = ranges.get(layer).copied().unwrap_or([0.0, 0.0]);
                ActQuant::from_range(lo, hi)
            }
            Activations::Dynamic => ActQuant::of(values),
        }
    }

    /// The forward pass; `seen(layer, quant)` is told each layer's input quantization.
    fn run(&self, images: &[f32], batch: usize, seen: &mut dyn FnMut(usize, ActQuant)) -> Vec<f32> {
        assert_eq!(
            images.len(),
            batch * SIDE * SIDE,
            "images are not {batch} x 1 x 28 x 28"
        );
        let q0 = self.input_quant(0, images);
        seen(0, q0);
        let mut x = Codes {
            data: images.iter().map(|&v| q0.code(v)).collect(),
            q: q0,
            hwc: [SIDE, SIDE, 1],
        };
        for (i, conv) in [&self.conv1, &self.conv2].into_iter().enumerate() {
            let [h, w, _] = x.hwc;
            let a = im2row_3x3(&x, batch, conv.w.k_padded());
            let pool = Some([batch, h, w, conv.w.n()]);
            x = self.layer_codes(conv, &a, batch * h * w, x.q, (i + 1, pool));
            seen(i + 1, x.q);
        }
        let h = self.layer_codes(&self.fc1, &x.data, batch, x.q, (3, None));
        seen(3, h.q);
        self.fc2.apply(&h.data, batch, h.q, false, |v| v)
    }

    /// `layer` on `a` with ReLU, max-pooled when `pool` gives the output's `[batch, h, w, c]`,
    /// as codes for layer `next`: static activations quantize in the epilogue, dynamic ones
    /// by the range of the output's floats.
    fn layer_codes(
        &self,
        layer: &Layer,
        a: &[u8],
        rows: usize,
        q: ActQuant,
        (next, pool): (usize, Option<[usize; 4]>),
    ) -> Codes {
        let hwc = pool.map_or([1, 1, layer.w.n()], |[_, h, w, c]| [h / 2, w / 2, c]);
        match &self.activations {
            Activations::Static { .. } => {
                let out_q = self.input_quant(next, &[]);
                let data = pooled(layer.apply(a, rows, q, true, |v| out_q.code(v)), pool);
                Codes {
                    data,
                    q: out_q,
                    hwc,
                }
            }
            Activations::Dynamic => {
                let values = pooled(layer.apply(a, rows, q, true, |v| v), pool);
                let q = ActQuant::of(&values);
                let data = values.iter().map(|&v| q.code(v)).collect();
                Codes { data, q, hwc }
            }
        }
    }
}

/// `values` max-pooled 2x2 when `pool` gives their `[batch, h, w, c]`, else as they are.
fn pooled<T: Copy + PartialOrd + Send + Sync + Default>(
    values: Vec<T>,
    pool: Option<[usize; 4]>,
) -> Vec<T> {
    match pool {
        Some([batch, h, w, c]) => pool_2x2(&values, batch, [h, w, c]),
        None => values,
    }
}

/// Activation codes of a batch, NHWC, with their quantization.
struct Codes {
    data: Vec<u8>,
    q: ActQuant,
    hwc: [usize; 3],
}

/// Rows of length `k` copied into rows of length `k4` (zeros after).
fn pad_rows(a: &[u8], k: usize, k4: usize) -> Vec<u8> {
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

/// The rows of a 3x3, padding 1, stride 1 convolution over NHWC codes: one row per output
/// position, `(ky, kx, c)` order, padding positions holding the zero point, padded to `k4`.
fn im2row_3x3(x: &Codes, batch: usize, k4: usize) -> Vec<u8> {
    let [h, w, c] = x.hwc;
    let zero = x.q.zero_point as u8;
    let mut a = vec![0u8; batch * h * w * k4];
    a.par_chunks_mut(w * k4).enumerate().for_each(|(row, out)| {
        let (b, oy) = (row / h, row % h);
        let image = &x.data[b * h * w * c..(b + 1) * h * w * c];
        for (ox, dst) in out.chunks_exact_mut(k4).enumerate() {
            for ky in 0..3 {
                for kx in 0..3 {
                    let d = &mut dst[(ky * 3 + kx) * c..(ky * 3 + kx + 1) * c];
                    let (iy, ix) = ((oy + ky).wrapping_sub(1), (ox + kx).wrapping_sub(1));
                    if iy < h && ix < w {
                        d.copy_from_slice(&image[(iy * w + ix) * c..(iy * w + ix + 1) * c]);
                    } else {
                        d.fill(zero);
                    }
                }
            }
        }
    });
    a
}

/// 2x2 max-pool, stride 2, over NHWC values (odd sides drop their last row/column).
fn pool_2x2<T: Copy + PartialOrd + Send + Sync + Default>(
    x: &[T],
    batch: usize,
    [h, w, c]: [usize; 3],
) -> Vec<T> {
    let (oh, ow) = (h / 2, w / 2);
    let max = |a: T, b: T| if b > a { b } else { a };
    let mut out = vec![T::default(); batch * oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, o)| {
        let (b, oy) = (row / oh, row % oh);
        let at = |y: usize, x: usize| ((b * h + y) * w + x) * c;
        for ox in 0..ow {
            let (t, u) = (at(2 * oy, 2 * ox), at(2 * oy + 1, 2 * ox));
            for ch in 0..c {
                let m = max(max(x[t + ch], x[t + c + ch]), max(x[u + ch], x[u + c + ch]));
                o[ox * c + ch] = m;
            }
        }
    });
    out
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
