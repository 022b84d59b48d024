//! Seeded parameter initialisation that follows PyTorch's defaults for `Conv2d` and `Linear`
//! (`kaiming_uniform_(a = sqrt(5))`, i.e. `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights and
//! biases alike), and the normal draws of GPT-style models (`normal_(0, std)`). Kiln draws the numbers itself from a seeded generator, so a model built from
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

    /// A parameter of `shape` with values drawn from `N(0, std^2)` (Box-Muller).
    pub(crate) fn normal<const D: usize>(
        &mut self,
        shape: [usize; D],
        std: f32,
        device: &Device,
    ) -> Param<Tensor<D>> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| {
                // u1 in (0, 1], so ln(u1) is finite.
                let u1: f64 = 1.0 - self.rng.random::<f64>();
                let u2: f64 = self.rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (z * f64::from(std)) as f32
            })
            .collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// A parameter of `shape` filled with `value` (biases at 0, LayerNorm scales at 1).
pub(crate) fn constant<const D: usize>(
    shape: [usize; D],
    value: f32,
    device: &Device,
) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::full(shape, value, device))
}
