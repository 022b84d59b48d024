//! Walks over a module's parameters and gradients: flatten into `f32` buffers and back.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use super::bucket::BucketLayout;
use crate::error::{MultiError, Result};

/// Trainable parameters (those that get gradients) with their element counts, in registration
/// order.
pub(crate) fn trainable_params<M: Module>(model: &M) -> Vec<(ParamId, usize)> {
    struct Collect(Vec<(ParamId, usize)>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.push((param.id, param.lazy_shape().num_elements()));
            }
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// The largest element-wise `|a - b|` of two buffers (e.g. two models' [`flatten_params`]),
/// over their common length. NaN when either holds a NaN at the same place or a difference is
/// one (`f32::max` would drop it), so a `<= tolerance` check fails on NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |max, d| {
            if max.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                max.max(d)
            }
        })
}

/// Every floating-point parameter of `model` (trainable or not, e.g. running statistics),
/// flattened in registration order.
pub fn flatten_params<M: Module>(model: &M) -> Result<Vec<f32>> {
    struct Flatten {
        out: Vec<f32>,
        error: Option<MultiError>,
    }
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.error.is_some() {
                return;
            }
            match read_f32(param.val(), || format!("reading parameter {}", param.id)) {
                Ok(values) => self.out.extend_from_slice(&values),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut flatten = Flatten {
        out: Vec::new(),
        error: None,
    };
    model.visit(&mut flatten);
    match flatten.error {
        Some(e) => Err(e),
        None => Ok(flatten.out),
    }
}

/// Replaces every floating-point parameter of `model` with values from `flat`, in the order of
/// [`flatten_params`], keeping ids, devices, dtypes and whether each requires a gradient.
///
/// # Errors
/// [`MultiError::Tensor`] when `flat` does not hold exactly the model's values.
pub fn load_params<M: Module>(model: M, flat: &[f32]) -> Result<M> {
    struct Load<'a> {
        flat: &'a [f32],
        offset: usize,
        error: Option<MultiError>,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.error.is_some() {
                return param;
            }
            let id = param.id;
            let elements = param.lazy_shape().num_elements();
            let Some(values) = self.flat.get(self.offset..self.offset + elements) else {
                self.error = Some(MultiError::Tensor {
                    context: format!("loading parameter {id}"),
                    detail: format!(
                        "the flat buffer has {} values, the model needs more",
                        self.flat.len()
                    ),
                });
                return param;
            };
            self.offset += elements;
            with_values(param, values.to_vec())
        }
    }
    let mut load = Load {
        flat,
        offset: 0,
        error: None,
    };
    let model = model.map(&mut load);
    if let Some(e) = load.error {
        return Err(e);
    }
    if load.offset != flat.len() {
        return Err(MultiError::Tensor {
            context: "loading parameters".to_string(),
            detail: format!(
                "the flat buffer has {} values, the model has {}",
                flat.len(),
                load.offset
            ),
        });
    }
    Ok(model)
}

/// Moves the gradients in `grads` into the bucket buffers: each one is added (or, with
/// `overwrite`, copied) at its place and its flag set to 1. Gradients of parameters outside
/// the layout stay in `grads`.
pub(crate) fn flatten_grads<M: Module>(
    model: &M,
    layout: &BucketLayout,
    grads: &mut GradientsParams,
    buffers: &mut [Vec<f32>],
    overwrite: bool,
) -> Result<()> {
    struct Flatten<'a> {
        layout: &'a BucketLayout,
        grads: &'a mut GradientsParams,
        buffers: &'a mut [Vec<f32>],
        overwrite: bool,
        error: Option<MultiError>,
    }
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(place) = self.layout.placements.get(&param.id) else {
                return;
            };
            if self.error.is_some() {
                return;
            }
            let buffer = &mut self.buffers[place.bucket];
            let target = &mut buffer[place.offset..place.offset + place.elements];
            let Some(grad) = self.grads.remove::<D>(param.id) else {
                if self.overwrite {
                    target.fill(0.0);
                    buffer[place.flag] = 0.0;
                }
                return;
            };
            match read_f32(grad, || {
                format!("reading the gradient of parameter {}", param.id)
            }) {
                Ok(values) if values.len() == target.len() => {
                    if self.overwrite {
                        target.copy_from_slice(&values);
                    } else {
                        target.iter_mut().zip(&values).for_each(|(t, v)| *t += v);
                    }
                    buffer[place.flag] = 1.0;
                }
                Ok(values) => {
                    self.error = Some(MultiError::Tensor {
                        context: format!("gradient of parameter {}", param.id),
                        detail: format!(
                            "has {} elements, the parameter {}",
                            values.len(),
                            target.len()
                        ),
                    })
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut flatten = Flatten {
        layout,
        grads,
        buffers,
        overwrite,
        error: None,
    };
    model.visit(&mut flatten);
    flatten.error.map_or(Ok(()), Err)
}

/// Fails when `grads` still holds gradients after the planned ones were taken out: they
/// belong to parameters that were not trainable when `planner` laid out its buffers.
pub(crate) fn ensure_all_placed(
    grads: &GradientsParams,
    context: &str,
    planner: &str,
) -> Result<()> {
    if grads.is_empty() {
        return Ok(());
    }
    Err(MultiError::Tensor {
        context: context.to_string(),
        detail: format!(
            "{} gradient(s) belong to parameters that were not trainable when {planner} \
             planned its buffers; create it once the model's structure and trainable \
             parameters are final",
            grads.len()
        ),
    })
}

/// Registers in `grads` a gradient rebuilt from the bucket buffers for every parameter whose
/// flag is non-zero (some rank had a gradient for it), on the parameter's device without
/// autodiff and in its dtype.
pub(crate) fn unflatten_grads<M: Module>(
    model: &M,
    layout: &BucketLayout,
    buffers: &[Vec<f32>],
    grads: &mut GradientsParams,
) {
    struct Unflatten<'a> {
        layout: &'a BucketLayout,
        buffers: &'a [Vec<f32>],
        grads: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(place) = self.layout.placements.get(&param.id) else {
                return;
            };
            let buffer = &self.buffers[place.bucket];
            if buffer[place.flag] == 0.0 {
                return;
            }
            let value = param.val();
            let values = buffer[place.offset..place.offset + place.elements].to_vec();
            let data = TensorData::new(values, value.shape());
            let device = value.device().without_autodiff();
            let grad = Tensor::<D>::from_data(data, (&device, value.dtype()));
            self.grads.register(param.id, grad);
        }
    }
    model.visit(&mut Unflatten {
        layout,
        buffers,
        grads,
    });
}

/// The values of `tensor` as `f32`, or an error saying what was being read.
pub(crate) fn read_f32<const D: usize>(
    tensor: Tensor<D>,
    context: impl Fn() -> String,
) -> Result<Vec<f32>> {
    let fail = |detail: String| MultiError::Tensor {
        context: context(),
        detail,
    };
    tensor
        .try_into_data()
        .map_err(|e| fail(e.to_string()))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| fail(format!("{e:?}")))
}

/// Copies the values of the trainable parameters into `buffer` at their places in `layout`
/// (every parameter must be in bucket 0, as in a single-bucket layout).
pub(crate) fn flatten_params_into<M: Module>(
    model: &M,
    layout: &BucketLayout,
    buffer: &mut [f32],
) -> Result<()> {
    struct Flatten<'a> {
        layout: &'a BucketLayout,
        buffer: &'a mut [f32],
        error: Option<MultiError>,
    }
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(place) = self.layout.placements.get(&param.id) else {
                return;
            };
            if self.error.is_some() {
                return;
            }
            match read_f32(param.val(), || format!("reading parameter {}", param.id)) {
                Ok(values) => self.buffer[place.offset..place.offset + place.elements]
                    .copy_from_slice(&values),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut flatten = Flatten {
        layout,
        buffer,
        error: None,
    };
    model.visit(&mut flatten);
    flatten.error.map_or(Ok(()), Err)
}

/// Replaces the trainable parameters of `model` with their values in `buffer`, laid out as
/// [`flatten_params_into`] writes them; other parameters are left as they are.
pub(crate) fn load_params_from<M: Module>(model: M, layout: &BucketLayout, buffer: &[f32]) -> M {
    struct Load<'a> {
        layout: &'a BucketLayout,
        buffer: &'a [f32],
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(place) = self.layout.placements.get(&param.id).copied() else {
                return param;
            };
            let values = self.buffer[place.offset..place.offset + place.elements].to_vec();
            with_values(param, values)
        }
    }
    model.map(&mut Load { layout, buffer })
}

/// `param` holding `values` (of its shape), keeping its id, device, dtype and whether it
/// requires a gradient.
fn with_values<const D: usize>(param: Param<Tensor<D>>, values: Vec<f32>) -> Param<Tensor<D>> {
    // The parameter's own setting: its tensor may be a non-leaf that reports none.
    let require_grad = param.is_require_grad();
    param.map(|tensor| {
        let data = TensorData::new(values, tensor.shape());
        let loaded = Tensor::from_data(data, (&tensor.device(), tensor.dtype()));
        if require_grad {
            loaded.require_grad()
        } else {
            loaded
        }
    })
}
