//! What a weight is quantized to: integer width and how many weights share one scale.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

/// Integer width of quantized weights. Both are symmetric: zero maps to zero and the range is
/// `[-qmax, qmax]` (int8: ±127, int4: ±7), as PyTorch's `qint8` weights with a symmetric
/// observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// 8-bit integers, one byte per weight.
    Int8,
    /// 4-bit integers, two weights per byte in the file.
    Int4,
}

impl QuantBits {
    /// The largest magnitude a quantized value takes.
    pub fn qmax(self) -> f32 {
        match self {
            QuantBits::Int8 => 127.0,
            QuantBits::Int4 => 7.0,
        }
    }

    /// The name on the command line and in files (`int8`, `int4`).
    pub fn name(self) -> &'static str {
        match self {
            QuantBits::Int8 => "int8",
            QuantBits::Int4 => "int4",
        }
    }
}

/// Which weights share one scale. Weights are grouped in PyTorch's layout: output channel
/// first (`[out, in]` for Linear, `[out, in, kh, kw]` for Conv2d).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the whole tensor (PyTorch's `quantize_dynamic` default).
    Tensor,
    /// One scale per output channel.
    Channel,
    /// One scale per run of this many consecutive weights of an output channel (the last run
    /// of a channel may be shorter).
    Block(NonZeroUsize),
}

impl Granularity {
    /// Scale groups of a `[channels, per_channel]` weight: (groups, group length) before
    /// padding, and the padded length of a channel.
    pub(crate) fn groups(self, channels: usize, per_channel: usize) -> GroupLayout {
        match self {
            Granularity::Tensor => GroupLayout {
                groups: 1,
                group_len: channels * per_channel,
                padded_channel: per_channel,
            },
            Granularity::Channel => GroupLayout {
                groups: channels,
                group_len: per_channel,
                padded_channel: per_channel,
            },
            Granularity::Block(block) => {
                let blocks = per_channel.div_ceil(block.get());
                GroupLayout {
                    groups: channels * blocks,
                    group_len: block.get(),
                    padded_channel: blocks * block.get(),
                }
            }
        }
    }
}

/// How a `[channels, per_channel]` weight splits into scale groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupLayout {
    /// Number of scales.
    pub groups: usize,
    /// Weights per scale (after padding each channel to `padded_channel`).
    pub group_len: usize,
    /// A channel's length padded with zeros to a whole number of groups.
    pub padded_channel: usize,
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Granularity::Tensor => f.write_str("tensor"),
            Granularity::Channel => f.write_str("channel"),
            Granularity::Block(n) => write!(f, "block:{n}"),
        }
    }
}

impl FromStr for Granularity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tensor" => Ok(Granularity::Tensor),
            "channel" => Ok(Granularity::Channel),
            _ => {
                let size = s.strip_prefix("block:").ok_or_else(|| {
                    format!("unknown granularity {s:?}: expected tensor, channel or block:N")
                })?;
                size.parse::<NonZeroUsize>()
                    .map(Granularity::Block)
                    .map_err(|_| format!("block size {size:?} is not a positive integer"))
            }
        }
    }
}

/// A weight quantization scheme: width and scale granularity. Scales are max-|w| / qmax per
/// group (min-max calibration of the weights; symmetric, so no zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantScheme {
    /// Integer width.
    pub bits: QuantBits,
    /// Weights per scale.
    pub granularity: Granularity,
}

impl QuantScheme {
    /// int8 with one scale per tensor, like PyTorch's `quantize_dynamic(..., dtype=qint8)`.
    pub const INT8: QuantScheme = QuantScheme {
        bits: QuantBits::Int8,
        granularity: Granularity::Tensor,
    };
}

impl fmt::Display for QuantScheme {
    /// `int8:tensor`, `int4:block:32`: the form [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.bits.name(), self.granularity)
    }
}

impl FromStr for QuantBits {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "int8" => Ok(QuantBits::Int8),
            "int4" => Ok(QuantBits::Int4),
            _ => Err(format!("unknown scheme {s:?}: expected int8 or int4")),
        }
    }
}

impl FromStr for QuantScheme {
    type Err = String;

    /// `int8`, `int8:channel`, `int4:block:32` (granularity `tensor` when left out).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (bits, granularity) = s.split_once(':').unwrap_or((s, "tensor"));
        Ok(QuantScheme {
            bits: bits.parse()?,
            granularity: granularity.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_print_and_parse_back() {
        for text in [
            "int8:tensor",
            "int8:channel",
            "int4:block:32",
            "int4:block:1",
        ] {
            let scheme: QuantScheme = text.parse().unwrap();
            assert_eq!(scheme.to_string(), text);
        }
        assert_eq!("int8".parse::<QuantScheme>().unwrap(), QuantScheme::INT8);
        assert!("int3".parse::<QuantScheme>().is_err());
        assert!("int8:block:0".parse::<QuantScheme>().is_err());
        assert!("int8:row".parse::<QuantScheme>().is_err());
    }

    #[test]
    fn block_groups_pad_each_channel() {
        let layout = Granularity::Block(NonZeroUsize::new(32).unwrap()).groups(32, 9);
        assert_eq!(
            layout,
            GroupLayout {
                groups: 32,
                group_len: 32,
                padded_channel: 32
            }
        );
        let layout = Granularity::Block(NonZeroUsize::new(32).unwrap()).groups(64, 288);
        assert_eq!(layout.groups, 64 * 9);
        assert_eq!(Granularity::Tensor.groups(4, 5).group_len, 20);
    }
}
