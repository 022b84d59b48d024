//! Seeded parameter initialisation that follows PyTorch's defaults for `Conv2d` and `Linear`
//! (`kaiming_uniform_(a = sqrt(5))`, i.e. `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights and
//! biases alike). Kiln draws the numbers itself from a seeded generator, so a model built from
//! the same seed is bit-identical on every run and every backend, whatever Burn's global RNG did.

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded source of PyTorch-style uniform initial values.
pub(crate) struct UniformInit {
    rng: StdRng,
}

impl UniformInit {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A parameter of `shape` with values drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub(crate) fn param<const D: usize>(
        &mut self,
        shape: [usize; D],
        fan_in: usize,
        device: &Device,
    ) -> Param<Tensor<D>> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
    }
}
