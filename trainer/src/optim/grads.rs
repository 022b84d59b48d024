//! Arithmetic on a model's gradients (Burn's [`GradientsParams`]): scaling and clipping by the
//! global L2 norm. (Accumulation over micro-steps is Burn's `GradientsAccumulator`.)

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// Multiplies every gradient by `factor`.
pub fn scale<M: Module>(model: &M, grads: GradientsParams, factor: f64) -> GradientsParams {
    struct Scale {
        grads: GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut visitor = Scale { grads, factor };
    model.visit(&mut visitor);
    visitor.grads
}

/// The L2 norm of all gradients together (each tensor's sum of squares in `f32`, added up
/// in `f64`).
pub fn global_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct Squares<'a> {
        grads: &'a GradientsParams,
        sum: f64,
    }
    impl ModuleVisitor for Squares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sum += g.clone().mul(g).sum().into_scalar::<f64>();
            }
        }
    }
    let mut visitor = Squares { grads, sum: 0.0 };
    model.visit(&mut visitor);
    visitor.sum.sqrt()
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_` does (by `max_norm / (norm + 1e-6)` when that is below 1); returns them
/// with the norm before clipping.
pub fn clip_global_norm<M: Module>(
    model: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let norm = global_norm(model, &grads);
    (clip_to(model, grads, norm, max_norm), norm)
}

/// The gradients, whose global L2 norm is `norm` (measured by the caller, e.g. over a
/// tensor-parallel group), scaled as [`clip_global_norm`] does.
pub fn clip_to<M: Module>(
    model: &M,
    grads: GradientsParams,
    norm: f64,
    max_norm: f64,
) -> GradientsParams {
    match kiln_multi::clip_coefficient(norm, max_norm) {
        Some(coefficient) => scale(model, grads, f64::from(coefficient)),
        None => grads,
    }
}

/// The sums of the squared gradients of the parameters in `split` and of the others.
pub fn squares_by<M: Module>(
    model: &M,
    grads: &GradientsParams,
    split: &std::collections::HashSet<ParamId>,
) -> (f64, f64) {
    struct Squares<'a> {
        grads: &'a GradientsParams,
        split: &'a std::collections::HashSet<ParamId>,
        sums: (f64, f64),
    }
    impl ModuleVisitor for Squares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let square = g.clone().mul(g).sum().into_scalar::<f64>();
                match self.split.contains(&param.id) {
                    true => self.sums.0 += square,
                    false => self.sums.1 += square,
                }
            }
        }
    }
    let mut visitor = Squares {
        grads,
        split,
        sums: (0.0, 0.0),
    };
    model.visit(&mut visitor);
    visitor.sums
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;

    use super::*;

    #[derive(Module, Debug)]
    struct Net {
        a: Linear,
        b: Linear,
    }

    fn grads_of(net: &Net, x: f32) -> GradientsParams {
        let device = Device::flex().autodiff();
        let input = Tensor::<2>::full([2, 3], x, &device);
        let loss = net.b.forward(net.a.forward(input)).sum();
        GradientsParams::from_grads(loss.backward(), net)
    }

    fn flat(net: &Net, grads: &GradientsParams) -> Vec<f32> {
        let mut out = Vec::new();
        for id in [net.a.weight.id, net.b.weight.id] {
            out.extend(grads.get::<2>(id).unwrap().into_data().iter::<f32>());
        }
        for bias in [&net.a.bias, &net.b.bias] {
            let id = bias.as_ref().unwrap().id;
            out.extend(grads.get::<1>(id).unwrap().into_data().iter::<f32>());
        }
        out
    }

    #[test]
    fn scale_and_clip_match_the_element_wise_definitions() {
        let device = Device::flex().autodiff();
        let net = Net {
            a: LinearConfig::new(3, 4).init(&device),
            b: LinearConfig::new(4, 2).init(&device),
        };
        let (g1, g2) = (grads_of(&net, 0.5), grads_of(&net, -2.0));
        let (f1, f2) = (flat(&net, &g1), flat(&net, &g2));
        let mut accumulator = burn::optim::GradientsAccumulator::new();
        accumulator.accumulate(&net, g1);
        accumulator.accumulate(&net, g2);
        let sum = accumulator.grads();
        let fs = flat(&net, &sum);
        for ((s, a), b) in fs.iter().zip(&f1).zip(&f2) {
            assert!((s - (a + b)).abs() <= 1e-6, "{s} vs {a} + {b}");
        }
        let norm = global_norm(&net, &sum);
        let expected: f64 = fs
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - expected).abs() <= 1e-5 * expected,
            "{norm} vs {expected}"
        );
        let (clipped, before) = clip_global_norm(&net, sum, expected / 4.0);
        assert_eq!(before, norm);
        let after = global_norm(&net, &clipped);
        assert!((after - expected / 4.0).abs() <= 1e-5 * expected, "{after}");
        let halved = scale(&net, grads_of(&net, 0.5), 0.5);
        for (h, a) in flat(&net, &halved).iter().zip(&f1) {
            assert!((h - a * 0.5).abs() <= 1e-7, "{h} vs {a}");
        }
    }
}
