//! Quantization of one weight tensor held as numbers (for files), and its inverse.

use super::scheme::{QuantBits, QuantScheme};

/// A weight tensor quantized under a scheme, in PyTorch's layout (output channel first).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// Shape in PyTorch's layout: `[out, in]` or `[out, in, kh, kw]`.
    pub shape: Vec<usize>,
    /// The scheme it was quantized with.
    pub scheme: QuantScheme,
    /// One integer per weight, in `[-qmax, qmax]`, row-major.
    pub values: Vec<i8>,
    /// One scale per group (see [`super::Granularity`]).
    pub scales: Vec<f32>,
}

/// The smallest max-|w| a scale is computed from, so that an all-zero group gets a finite
/// scale (its weights quantize to 0 and dequantize to 0 exactly).
pub(crate) const MIN_RANGE: f32 = f32::MIN_POSITIVE;

impl QuantizedTensor {
    /// Quantizes `values` of `shape` (PyTorch layout, at least one dimension): per group,
    /// `scale = max|w| / qmax` and `q = clamp(round_half_even(w / scale), -qmax, qmax)`.
    ///
    /// # Panics
    /// When `values.len()` is not the product of `shape` (a caller bug, not bad input).
    pub fn quantize(values: &[f32], shape: &[usize], scheme: QuantScheme) -> Self {
        let len: usize = shape.iter().product();
        assert_eq!(values.len(), len, "values do not fill shape {shape:?}");
        let qmax = scheme.bits.qmax();
        let mut scales = vec![0.0f32; group_count(shape, scheme)];
        for (i, w) in values.iter().enumerate() {
            let g = group_of(i, shape, scheme);
            scales[g] = scales[g].max(w.abs());
        }
        for s in &mut scales {
            *s = s.max(MIN_RANGE) / qmax;
        }
        let values = values
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let scale = scales[group_of(i, shape, scheme)];
                (w / scale).round_ties_even().clamp(-qmax, qmax) as i8
            })
            .collect();
        Self {
            shape: shape.to_vec(),
            scheme,
            values,
            scales,
        }
    }

    /// The float weights these integers stand for: `q * scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| f32::from(q) * self.scales[group_of(i, &self.shape, self.scheme)])
            .collect()
    }

    /// The integers as stored in a file: one byte each for int8, two per byte for int4 (low
    /// nibble first).
    pub fn packed_values(&self) -> Vec<u8> {
        match self.scheme.bits {
            QuantBits::Int8 => self.values.iter().map(|&v| v as u8).collect(),
            QuantBits::Int4 => self
                .values
                .chunks(2)
                .map(|pair| {
                    let low = pair[0] as u8 & 0x0F;
                    let high = pair.get(1).map_or(0, |&v| v as u8 & 0x0F);
                    low | (high << 4)
                })
                .collect(),
        }
    }

    /// Reverses [`packed_values`](Self::packed_values) for `len` weights.
    ///
    /// Returns `None` when `bytes` has the wrong length for `len` weights or a value lies
    /// outside the scheme's range (a corrupt file).
    pub fn unpack_values(bytes: &[u8], len: usize, bits: QuantBits) -> Option<Vec<i8>> {
        let values: Vec<i8> = match bits {
            QuantBits::Int8 => {
                if bytes.len() != len {
                    return None;
                }
                bytes.iter().map(|&b| b as i8).collect()
            }
            QuantBits::Int4 => {
                if bytes.len() != len.div_ceil(2) {
                    return None;
                }
                // Shift the nibble to the top and back to extend its sign.
                let nibble = |n: u8| ((n << 4) as i8) >> 4;
                bytes
                    .iter()
                    .flat_map(|&b| [nibble(b & 0x0F), nibble(b >> 4)])
                    .take(len)
                    .collect()
            }
        };
        let qmax = bits.qmax() as i8;
        values
            .iter()
            .all(|v| (-qmax..=qmax).contains(v))
            .then_some(values)
    }
}

/// Number of scales a weight of `shape` has under `scheme`.
pub fn group_count(shape: &[usize], scheme: QuantScheme) -> usize {
    let (channels, per_channel) = channels(shape);
    scheme.granularity.groups(channels, per_channel).groups
}

/// `(output channels, weights per channel)` of a PyTorch-layout shape.
fn channels(shape: &[usize]) -> (usize, usize) {
    let channels = shape.first().copied().unwrap_or(1).max(1);
    let len: usize = shape.iter().product();
    (channels, len / channels)
}

/// The scale group of the `i`-th weight (row-major) of a tensor of `shape`.
fn group_of(i: usize, shape: &[usize], scheme: QuantScheme) -> usize {
    let (channels, per_channel) = channels(shape);
    let layout = scheme.granularity.groups(channels, per_channel);
    let (channel, within) = (i / per_channel, i % per_channel);
    match scheme.granularity {
        super::Granularity::Tensor => 0,
        super::Granularity::Channel => channel,
        super::Granularity::Block(block) => {
            channel * (layout.padded_channel / block.get()) + within / block.get()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Granularity;
    use std::num::NonZeroUsize;

    fn scheme(bits: QuantBits, granularity: Granularity) -> QuantScheme {
        QuantScheme { bits, granularity }
    }

    #[test]
    fn int8_per_tensor_matches_closed_form() {
        // max |w| = 31.75, scale = 0.25 (exact in binary): 0.375 -> 1.5 -> 2 and
        // 0.125 -> 0.5 -> 0, 0.625 -> 2.5 -> 2 (halves round to even).
        let w = [1.0, -31.75, 0.375, 0.125, 0.625, 40.0 / 3.0];
        let q = QuantizedTensor::quantize(&w, &[2, 3], QuantScheme::INT8);
        assert_eq!(q.scales, vec![0.25]);
        assert_eq!(q.values, vec![4, -127, 2, 0, 2, 53]);
        let back = q.dequantize();
        for (a, b) in back.iter().zip(w) {
            assert!((a - b).abs() <= q.scales[0] / 2.0, "{a} vs {b}");
        }
    }

    #[test]
    fn per_channel_and_block_scales_follow_their_groups() {
        // Two channels of 3: maxima 3 and 0.7.
        let w = [1.0, -3.0, 2.0, 0.7, 0.0, -0.1];
        let per_channel =
            QuantizedTensor::quantize(&w, &[2, 3], scheme(QuantBits::Int4, Granularity::Channel));
        assert_eq!(per_channel.scales.len(), 2);
        assert!((per_channel.scales[0] - 3.0 / 7.0).abs() < 1e-7);
        assert!((per_channel.scales[1] - 0.1).abs() < 1e-7);
        assert_eq!(per_channel.values, vec![2, -7, 5, 7, 0, -1]);
        // Blocks of 2 inside each channel of 3: [1,-3] [2] | [0.7,0] [-0.1].
        let block = Granularity::Block(NonZeroUsize::new(2).unwrap());
        let blocks = QuantizedTensor::quantize(&w, &[2, 3], scheme(QuantBits::Int8, block));
        let expected = [3.0, 2.0, 0.7, 0.1].map(|m: f32| m / 127.0);
        assert_eq!(blocks.scales.len(), 4);
        for (s, e) in blocks.scales.iter().zip(expected) {
            assert!((s - e).abs() < 1e-9, "{s} vs {e}");
        }
        assert_eq!(blocks.values[2], 127);
        assert_eq!(blocks.values[5], -127);
    }

    #[test]
    fn zero_groups_stay_zero_and_int4_packing_round_trips() {
        let w = [0.0, 0.0, 0.0, 5.0, -5.0];
        let q = QuantizedTensor::quantize(&w, &[5], scheme(QuantBits::Int4, Granularity::Tensor));
        assert_eq!(q.values, vec![0, 0, 0, 7, -7]);
        let packed = q.packed_values();
        assert_eq!(packed.len(), 3);
        let unpacked = QuantizedTensor::unpack_values(&packed, 5, QuantBits::Int4).unwrap();
        assert_eq!(unpacked, q.values);
        assert!(QuantizedTensor::unpack_values(&packed, 7, QuantBits::Int4).is_none());
        // -8 is a valid nibble but outside the symmetric range: a corrupt file.
        assert!(QuantizedTensor::unpack_values(&[0x08], 1, QuantBits::Int4).is_none());
        let zeros = QuantizedTensor::quantize(&[0.0; 4], &[2, 2], QuantScheme::INT8);
        assert_eq!(zeros.dequantize(), vec![0.0; 4]);
    }
}
