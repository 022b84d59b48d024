/// Per-channel normalisation `(x / 255 - mean) / std` of 8-bit pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    /// Mean of the data set's pixels, on the 0..1 scale.
    pub mean: f32,
    /// Standard deviation of the data set's pixels, on the 0..1 scale.
    pub std: f32,
}

impl Normalize {
    /// MNIST's statistics, as in PyTorch's examples: `Normalize((0.1307,), (0.3081,))`.
    pub const MNIST: Normalize = Normalize {
        mean: 0.1307,
        std: 0.3081,
    };

    /// Normalises one 8-bit pixel.
    #[inline]
    pub fn apply(&self, pixel: u8) -> f32 {
        (pixel as f32 / 255.0 - self.mean) / self.std
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_torchvision_to_tensor_then_normalize() {
        // torchvision: (ToTensor()(255) - 0.1307) / 0.3081 = 2.8214867 in float32
        let n = Normalize::MNIST;
        assert!((n.apply(255) - 2.821_486_7).abs() < 1e-6);
        assert!((n.apply(0) + 0.424_212_92).abs() < 1e-6);
    }
}
