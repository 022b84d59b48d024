//! Integer inference for torchvision's ResNets: every convolution (stem, blocks, shortcut
//! projections) with its BatchNorm folded in before quantization, int8 weights per output
//! channel, 7-bit activations per tensor, `u8 x i8 -> i32` GEMMs ([`kiln_kernels::int8`]).
//!
//! Activations flow NHWC as codes. Each convolution runs per image (im2row, GEMM, epilogue in
//! the thread's cache); a block's last convolution adds the shortcut (the block input's codes
//! dequantized there, or the projection's float output) in its epilogue before the ReLU and the
//! next quantization. The stem's max-pool runs on codes (quantization is monotone), the
//! global average pool dequantizes the mean code, and the classifier runs in float32.
//!
//! Quantization points, in order: the image, the stem's output, then each convolution's
//! output inside every block (its last one being the block's output); [`Activations`] holds
//! one range per point when static.

use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, TensorData};
use kiln_kernels::int8::{ActQuant, Epilogue, Residual, gemm_u8i8_rows};
use rayon::prelude::*;

use super::int8::{Activations, Codes, Geometry, Layer, floats, im2row};
use crate::resnet::{ResNet, ResidualBlock};

/// Output positions per GEMM call inside an image: their rows of A (up to 256 x 4.6 KiB)
/// stay in the core's cache.
const POSITIONS: usize = 256;

/// A convolution with its BatchNorm folded in, on the integer path.
#[derive(Debug, Clone)]
struct ConvUnit {
    layer: Layer,
    geometry: Geometry,
}

/// One residual block: its convolutions in order (ReLU after each; the last adds the
/// shortcut first) and the shortcut's projection, if any.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvUnit>,
    downsample: Option<ConvUnit>,
}

/// A ResNet with integer convolutions.
#[derive(Debug, Clone)]
pub struct Int8ResNet {
    stem: ConvUnit,
    blocks: Vec<Block>,
    /// The classifier, `[classes][features]`, and its bias.
    fc: (Vec<Vec<f32>>, Vec<f32>),
    activations: Activations,
}

impl ConvUnit {
    /// `conv` followed by `bn` (running statistics) as one convolution, weights quantized per
    /// output channel after folding; `None` for what the integer path does not run (groups,
    /// dilation, non-square kernels or strides, asymmetric padding).
    fn folded(conv: &Conv2d, bn: &BatchNorm) -> Option<ConvUnit> {
        let [o, i, kh, kw] = conv.weight.dims();
        let pad = match conv.padding {
            PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
            PaddingConfig2d::Valid => 0,
            _ => return None,
        };
        let square = kh == kw && conv.stride[0] == conv.stride[1];
        if conv.groups != 1 || conv.dilation != [1, 1] || !square || pad >= kh {
            return None;
        }
        let (gamma, beta) = (floats(bn.gamma.val()), floats(bn.beta.val()));
        let (mean, var) = (
            floats(bn.running_mean.value()),
            floats(bn.running_var.value()),
        );
        let bias = conv.bias.as_ref().map(|b| floats(b.val()));
        let eps = bn.epsilon as f32;
        let scale: Vec<f32> = (0..o).map(|c| gamma[c] / (var[c] + eps).sqrt()).collect();
        let shift = (0..o)
            .map(|c| beta[c] - mean[c] * scale[c] + bias.as_ref().map_or(0.0, |b| b[c] * scale[c]))
            .collect();
        let w = floats(conv.weight.val());
        // [o, i, kh, kw] -> [o, kh, kw, i] (the NHWC im2row order), times the channel's scale.
        let mut p = vec![0.0; w.len()];
        for (idx, v) in w.iter().enumerate() {
            let (oo, rest) = (idx / (i * kh * kw), idx % (i * kh * kw));
            let (ii, y, x) = (rest / (kh * kw), rest / kw % kh, rest % kw);
            p[((oo * kh + y) * kw + x) * i + ii] = *v * scale[oo];
        }
        Some(ConvUnit {
            layer: Layer::new(&p, o, shift, false),
            geometry: Geometry {
                k: kh,
                stride: conv.stride[0],
                pad,
            },
        })
    }

    /// The output's `[h, w, c]` for an input of `[h, w, _]`.
    fn out_hwc(&self, [h, w, _]: [usize; 3]) -> [usize; 3] {
        [self.geometry.out(h), self.geometry.out(w), self.layer.w.n()]
    }

    /// This convolution of the codes `x` (`batch` images), ReLU'd when `relu`, `residual`
    /// (the output's shape) added before it; `put` writes each image's rows.
    fn run<T: Copy + Default + Send>(
        &self,
        x: &Codes,
        batch: usize,
        (relu, residual): (bool, Option<Residual>),
        put: impl Fn(&Epilogue, &[i32], usize, Option<Residual>, &mut [T]) + Sync,
    ) -> Vec<T> {
        let [h, w, c] = x.hwc;
        let [oh, ow, n] = self.out_hwc(x.hwc);
        let affine = self.layer.affine(x.q);
        let epilogue = affine.epilogue(relu);
        let image_out = oh * ow * n;
        let mut out = vec![T::default(); batch * image_out];
        if out.is_empty() {
            return out;
        }
        let (zero, k4, n16) = (
            x.q.zero_point as u8,
            self.layer.w.k_padded(),
            self.layer.w.n_padded(),
        );
        out.par_chunks_mut(image_out).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(a, acc), (b, out)| {
                let image = &x.data[b * h * w * c..(b + 1) * h * w * c];
                // Chunks of positions, so that their rows of A stay in the core's cache.
                for (i, out) in out.chunks_mut(POSITIONS * n).enumerate() {
                    let positions = i * POSITIONS..i * POSITIONS + out.len() / n;
                    let rows = positions.len();
                    let at = b * image_out + positions.start * n;
                    im2row(image, x.hwc, self.geometry, (zero, k4), positions, a);
                    gemm_u8i8_rows(a, rows, &self.layer.w, acc);
                    let residual = residual.map(|r| r.part(at..at + rows * n));
                    put(&epilogue, acc, n16, residual, out);
                }
            },
        );
        out
    }
}

impl Block {
    fn new(block: &ResidualBlock) -> Option<Block> {
        let (pairs, downsample) = match block {
            ResidualBlock::Basic(b) => (
                vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2)],
                b.downsample.as_ref(),
            ),
            ResidualBlock::Bottleneck(b) => (
                vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2), (&b.conv3, &b.bn3)],
                b.downsample.as_ref(),
            ),
        };
        let convs = pairs
            .into_iter()
            .map(|(c, bn)| ConvUnit::folded(c, bn))
            .collect::<Option<Vec<_>>>()?;
        let downsample = match downsample {
            Some(d) => Some(ConvUnit::folded(&d.conv, &d.bn)?),
            None => None,
        };
        Some(Block { convs, downsample })
    }
}

impl Int8ResNet {
    /// The integer model of `model` (BatchNorms folded into their convolutions, weights int8
    /// per output channel), or `None` when a convolution is of a kind the integer path does
    /// not run.
    pub fn new(model: &ResNet, activations: Activations) -> Option<Int8ResNet> {
        let blocks = model
            .layer1
            .iter()
            .chain(&model.layer2)
            .chain(&model.layer3)
            .chain(&model.layer4)
            .map(Block::new)
            .collect::<Option<Vec<_>>>()?;
        let [features, classes] = model.fc.weight.dims();
        let w = floats(model.fc.weight.val());
        let fc_w = (0..classes)
            .map(|j| (0..features).map(|i| w[i * classes + j]).collect())
            .collect();
        let fc_b = model
            .fc
            .bias
            .as_ref()
            .map_or(vec![0.0; classes], |b| floats(b.val()));
        Some(Int8ResNet {
            stem: ConvUnit::folded(&model.conv1, &model.bn1)?,
            blocks,
            fc: (fc_w, fc_b),
            activations,
        })
    }

    /// How this model quantizes its activations.
    pub fn activations(&self) -> &Activations {
        &self.activations
    }

    /// Outputs per image.
    pub fn classes(&self) -> usize {
        self.fc.1.len()
    }

    /// Logits `[batch, classes]` on the same device for images `[batch, 3, h, w]`.
    ///
    /// # Panics
    /// When the images have another number of channels than the stem takes, or are smaller
    /// than its kernel (callers check shapes first).
    pub fn forward_tensor(&self, images: Tensor<4>) -> Tensor<2> {
        let (dims, device) = (images.dims(), images.device());
        let logits = self.run(&floats(images), dims, &mut |_, _| {});
        Tensor::from_data(TensorData::new(logits, [dims[0], self.classes()]), &device)
    }

    /// Records every quantization point's range over `batches` (run with dynamic
    /// activations), then fixes them: static activations (min-max calibration).
    pub fn calibrate(&mut self, batches: impl IntoIterator<Item = Tensor<4>>) {
        self.activations = Activations::Dynamic;
        self.activations = Activations::calibrated(batches, |images, seen| {
            let dims = images.dims();
            self.run(&floats(images), dims, seen);
        });
    }

    /// The forward pass over NCHW `images` of shape `dims`; `seen(point, quant)` is told each
    /// quantization point's map.
    fn run(
        &self,
        images: &[f32],
        dims: [usize; 4],
        seen: &mut dyn FnMut(usize, ActQuant),
    ) -> Vec<f32> {
        let [batch, c, h, w] = dims;
        let q = self.activations.quant(0, images);
        seen(0, q);
        let x = Codes {
            data: nhwc_codes(images, dims, q),
            q,
            hwc: [h, w, c],
        };
        let mut point = 1;
        let stem = self.codes_for(point, &self.stem, &x, batch, None);
        seen(point, stem.q);
        let mut x = max_pool_3x3_s2(&stem, batch);
        for block in &self.blocks {
            // The shortcut: the projection's floats, or the block's input codes themselves.
            let projected = block.downsample.as_ref().map(|d| {
                d.run(&x, batch, (false, None), |e, acc, s, r, out: &mut [f32]| {
                    e.floats(acc, s, r, out)
                })
            });
            let shortcut = match &projected {
                Some(p) => Residual::Floats(p),
                None => Residual::Codes(&x.data, x.q),
            };
            let last = block.convs.len() - 1;
            let mut y: Option<Codes> = None;
            for (i, conv) in block.convs.iter().enumerate() {
                point += 1;
                let residual = (i == last).then_some(shortcut);
                let out = self.codes_for(point, conv, y.as_ref().unwrap_or(&x), batch, residual);
                seen(point, out.q);
                y = Some(out);
            }
            if let Some(y) = y {
                x = y;
            }
        }
        self.classify(&x, batch)
    }

    /// `conv` of `x` (ReLU, `residual` added first) as the codes of point `point`.
    fn codes_for(
        &self,
        point: usize,
        conv: &ConvUnit,
        x: &Codes,
        batch: usize,
        residual: Option<Residual>,
    ) -> Codes {
        let run = (true, residual);
        self.activations.codes(
            point,
            conv.out_hwc(x.hwc),
            |q| {
                conv.run(x, batch, run, |e, acc, s, r, out| {
                    e.codes(acc, s, r, q, out)
                })
            },
            || conv.run(x, batch, run, |e, acc, s, r, out| e.floats(acc, s, r, out)),
        )
    }

    /// Global average pool (the mean code, dequantized) and the float classifier.
    fn classify(&self, x: &Codes, batch: usize) -> Vec<f32> {
        let [h, w, c] = x.hwc;
        let (fc_w, fc_b) = &self.fc;
        let mut logits = Vec::with_capacity(batch * fc_b.len());
        for image in x.data.chunks_exact(h * w * c).take(batch) {
            let mut sums = vec![0u32; c];
            for pixel in image.chunks_exact(c) {
                for (s, &v) in sums.iter_mut().zip(pixel) {
                    *s += u32::from(v);
                }
            }
            let features: Vec<f32> = sums
                .iter()
                .map(|&s| x.q.scale * (s as f32 / (h * w) as f32 - x.q.zero_point as f32))
                .collect();
            for (row, b) in fc_w.iter().zip(fc_b) {
                logits.push(b + row.iter().zip(&features).map(|(w, f)| w * f).sum::<f32>());
            }
        }
        logits
    }
}

/// NCHW floats as NHWC codes of `q`.
fn nhwc_codes(images: &[f32], [batch, c, h, w]: [usize; 4], q: ActQuant) -> Vec<u8> {
    assert_eq!(
        images.len(),
        batch * c * h * w,
        "images are not {batch} x {c} x {h} x {w}"
    );
    let mut out = vec![0u8; images.len()];
    out.par_chunks_mut(h * w * c)
        .zip(images.par_chunks(c * h * w))
        .for_each(|(dst, src)| {
            for (p, pixel) in dst.chunks_exact_mut(c).enumerate() {
                for (ch, v) in pixel.iter_mut().enumerate() {
                    *v = q.code(src[ch * h * w + p]);
                }
            }
        });
    out
}

/// torchvision's stem max-pool (3x3, stride 2, padding 1: padded positions never win) on
/// NHWC codes.
fn max_pool_3x3_s2(x: &Codes, batch: usize) -> Codes {
    let [h, w, c] = x.hwc;
    let g = Geometry {
        k: 3,
        stride: 2,
        pad: 1,
    };
    let (oh, ow) = (g.out(h), g.out(w));
    let mut out = vec![0u8; batch * oh * ow * c];
    out.par_chunks_mut(oh * ow * c)
        .enumerate()
        .for_each(|(b, dst)| {
            let image = &x.data[b * h * w * c..(b + 1) * h * w * c];
            for (pos, o) in dst.chunks_exact_mut(c).enumerate() {
                let (oy, ox) = (pos / ow, pos % ow);
                for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                    for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                        let src = &image[(iy * w + ix) * c..(iy * w + ix + 1) * c];
                        for (m, &v) in o.iter_mut().zip(src) {
                            *m = (*m).max(v);
                        }
                    }
                }
            }
        });
    Codes {
        data: out,
        q: x.q,
        hwc: [oh, ow, c],
    }
}
