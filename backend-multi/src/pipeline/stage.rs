//! Stages: the parts of a model that a pipeline places on devices.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Gradients, Tensor};

use crate::error::{MultiError, Result};

/// A float tensor passed between stages: an activation forward, its gradient backward.
#[derive(Debug, Clone)]
pub enum Activation {
    /// `[batch, features]`.
    Rank2(Tensor<2>),
    /// `[batch, a, b]`.
    Rank3(Tensor<3>),
    /// `[batch, channels, height, width]`.
    Rank4(Tensor<4>),
}

macro_rules! each_rank {
    ($value:expr, $t:ident => $body:expr) => {
        match $value {
            Activation::Rank2($t) => Activation::Rank2($body),
            Activation::Rank3($t) => Activation::Rank3($body),
            Activation::Rank4($t) => Activation::Rank4($body),
        }
    };
}

impl Activation {
    /// The tensor's rank.
    pub fn rank(&self) -> usize {
        match self {
            Activation::Rank2(_) => 2,
            Activation::Rank3(_) => 3,
            Activation::Rank4(_) => 4,
        }
    }

    /// Samples in the (micro-)batch: the first dimension.
    pub fn batch_len(&self) -> usize {
        match self {
            Activation::Rank2(t) => t.dims()[0],
            Activation::Rank3(t) => t.dims()[0],
            Activation::Rank4(t) => t.dims()[0],
        }
    }

    /// Samples `start..start + len` of the batch.
    pub fn narrow_batch(self, start: usize, len: usize) -> Self {
        each_rank!(self, t => t.narrow(0, start, len))
    }

    /// Cut from its graph and moved to `device` (a transfer between stages).
    pub fn detach_to(self, device: &Device) -> Self {
        each_rank!(self, t => t.detach().to_device(device))
    }

    /// A new leaf of the graph that requires a gradient: a stage's input.
    pub fn require_grad(self) -> Self {
        each_rank!(self, t => t.require_grad())
    }

    /// The gradient of this leaf in `grads`, if it has one.
    pub fn grad(&self, grads: &Gradients) -> Option<Self> {
        Some(match self {
            Activation::Rank2(t) => Activation::Rank2(t.grad(grads)?),
            Activation::Rank3(t) => Activation::Rank3(t.grad(grads)?),
            Activation::Rank4(t) => Activation::Rank4(t.grad(grads)?),
        })
    }

    /// Backpropagates `grad_out`, the gradient of the loss with respect to this output, through
    /// the graph that produced it: `(self * grad_out).sum().backward()`.
    pub(crate) fn backward_with(&self, grad_out: Activation, device: &Device) -> Option<Gradients> {
        let grad_out = grad_out.detach_to(device);
        Some(match (self, grad_out) {
            (Activation::Rank2(y), Activation::Rank2(g)) => y.clone().mul(g).sum().backward(),
            (Activation::Rank3(y), Activation::Rank3(g)) => y.clone().mul(g).sum().backward(),
            (Activation::Rank4(y), Activation::Rank4(g)) => y.clone().mul(g).sum().backward(),
            _ => return None,
        })
    }
}

/// One stage of a pipeline: a module placed on a device, with its own optimizer.
///
/// [`ModuleStage`] implements it for any Burn module and forward function; the trait is
/// object-safe so that stages of different types form one pipeline.
pub trait PipelineStage: Send {
    /// A name for messages (e.g. `conv`, `classifier`).
    fn name(&self) -> &str;

    /// The autodiff device the stage runs on.
    fn device(&self) -> &Device;

    /// Checks that every parameter lives on [`device`](Self::device).
    ///
    /// # Errors
    /// [`MultiError::Placement`] naming the first misplaced parameter and both devices.
    fn validate_placement(&self, stage: usize) -> Result<()>;

    /// The forward pass of one micro-batch; the output keeps its graph.
    ///
    /// # Errors
    /// [`MultiError::Pipeline`] when `input` has the wrong rank for this stage.
    fn forward(&self, stage: usize, input: Activation) -> Result<Activation>;

    /// Adds the parameter gradients in `grads` to this step's sum.
    fn accumulate(&mut self, grads: Gradients);

    /// One optimizer step with the summed gradients, which are then cleared.
    fn step(&mut self, lr: f64);

    /// The module's floating-point parameters, flattened in registration order (to compare
    /// with a single-device run, or to checkpoint).
    ///
    /// # Errors
    /// When a parameter cannot be read back from its device.
    fn flatten_params(&self) -> Result<Vec<f32>>;
}

/// A [`PipelineStage`] made of a Burn module, its forward function from a rank-`I` to a
/// rank-`O` tensor, and its optimizer.
pub struct ModuleStage<M, F, const I: usize, const O: usize> {
    name: String,
    model: Option<M>,
    forward: F,
    optimizer: ModuleOptimizer,
    accumulated: GradientsAccumulator<M>,
    device: Device,
}

impl<M, F, const I: usize, const O: usize> ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
{
    /// A stage named `name` running `model` with `forward` on `device`, stepping `optimizer`.
    pub fn new(
        name: impl Into<String>,
        model: M,
        forward: F,
        optimizer: ModuleOptimizer,
        device: Device,
    ) -> Self {
        Self {
            name: name.into(),
            model: Some(model),
            forward,
            optimizer,
            accumulated: GradientsAccumulator::new(),
            device,
        }
    }

    /// The stage's module.
    pub fn model(&self) -> &M {
        self.model
            .as_ref()
            .expect("the model is only taken during a step")
    }

    /// The stage's module, giving up the stage.
    pub fn into_model(self) -> M {
        self.model.expect("the model is only taken during a step")
    }
}

impl<M, F, const I: usize, const O: usize> PipelineStage for ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
    ModuleOptimizer: Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn validate_placement(&self, stage: usize) -> Result<()> {
        struct Check<'a> {
            device: &'a Device,
            path: Vec<String>,
            misplaced: Option<(String, Device)>,
        }
        impl ModuleVisitor for Check<'_> {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let device = param.lazy_device();
                // Device equality ignores autodiff; a parameter built on the plain device in
                // an autodiff stage (or the reverse) is misplaced too: it would never learn.
                let other_backend = device.is_autodiff() != self.device.is_autodiff();
                if self.misplaced.is_none() && (device != *self.device || other_backend) {
                    self.misplaced = Some((self.path.join("."), device));
                }
            }
        }
        let mut check = Check {
            device: &self.device,
            path: Vec::new(),
            misplaced: None,
        };
        self.model().visit(&mut check);
        match check.misplaced {
            None => Ok(()),
            Some((layer, found)) => Err(MultiError::Placement {
                stage,
                stage_name: self.name.clone(),
                layer,
                found: format!("{found:?}"),
                expected: format!("{:?}", self.device),
            }),
        }
    }

    fn forward(&self, stage: usize, input: Activation) -> Result<Activation> {
        let rank = input.rank();
        let wrong_rank = || MultiError::Pipeline {
            stage,
            reason: format!(
                "stage '{}' takes rank-{I} input, got rank {rank} from the previous stage",
                self.name
            ),
        };
        let output = match (I, input) {
            (2, Activation::Rank2(x)) => {
                let dims = x_dims(&x);
                self.run(x.reshape::<I, _>(dims))
            }
            (3, Activation::Rank3(x)) => {
                let dims = x_dims(&x);
                self.run(x.reshape::<I, _>(dims))
            }
            (4, Activation::Rank4(x)) => {
                let dims = x_dims(&x);
                self.run(x.reshape::<I, _>(dims))
            }
            _ => return Err(wrong_rank()),
        };
        output.ok_or_else(|| MultiError::Pipeline {
            stage,
            reason: format!(
                "stage '{}' produces rank-{O} output, which a pipeline cannot carry (ranks 2 to 4)",
                self.name
            ),
        })
    }

    fn accumulate(&mut self, mut grads: Gradients) {
        let model = self
            .model
            .as_ref()
            .expect("the model is only taken during a step");
        let params = GradientsParams::from_module(&mut grads, model);
        self.accumulated.accumulate(model, params);
    }

    fn step(&mut self, lr: f64) {
        let model = self
            .model
            .take()
            .expect("the model is only taken during a step");
        let grads = self.accumulated.grads();
        self.model = Some(self.optimizer.step(lr, model, grads));
    }

    fn flatten_params(&self) -> Result<Vec<f32>> {
        crate::data_parallel::flatten_params(self.model())
    }
}

impl<M, F, const I: usize, const O: usize> ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
{
    fn run(&self, input: Tensor<I>) -> Option<Activation> {
        let output = (self.forward)(self.model(), input);
        let dims = output.dims();
        Some(match O {
            2 => Activation::Rank2(output.reshape(to_array::<2>(&dims)?)),
            3 => Activation::Rank3(output.reshape(to_array::<3>(&dims)?)),
            4 => Activation::Rank4(output.reshape(to_array::<4>(&dims)?)),
            _ => return None,
        })
    }
}

/// `x`'s dimensions as an array of length `I` (the caller matched the rank already).
fn x_dims<const R: usize, const I: usize>(x: &Tensor<R>) -> [usize; I] {
    to_array::<I>(&x.dims()).expect("ranks were matched by the caller")
}

fn to_array<const N: usize>(dims: &[usize]) -> Option<[usize; N]> {
    dims.try_into().ok()
}
