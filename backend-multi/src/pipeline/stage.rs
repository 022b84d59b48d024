//! Stages: the parts of a model that a pipeline places on devices.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use kiln_kernels::step::{self, NodeKey};

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

/// One stage of a pipeline: a module placed on a device, accumulating its gradients over the
/// micro-batches of a step.
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

    /// Called on the stage's thread before the first pass of a step of `micro_batches`
    /// micro-batches, when the pipeline lets stages defer work
    /// ([`PipelineConfig::defer_weight_gradients`](super::PipelineConfig)): work that does not
    /// feed the backward pass (weight gradients) may then wait for [`end_step`](Self::end_step).
    /// The default defers nothing.
    fn begin_step(&mut self, micro_batches: usize) {
        let _ = micro_batches;
    }

    /// Called on the stage's thread after the last backward pass of a step begun with
    /// [`begin_step`](Self::begin_step): finishes the deferred work, so that
    /// [`take_grads`](Self::take_grads) includes it. Returns how many parameters' gradients
    /// were deferred.
    fn end_step(&mut self) -> usize {
        0
    }

    /// Drops the deferred work of a step that failed.
    fn abort_step(&mut self) {}

    /// The gradients summed since the last call, keyed by parameter id (on the stage's
    /// device), for the optimizer; the sum starts again from zero.
    fn take_grads(&mut self) -> GradientsParams;
}

/// A [`PipelineStage`] made of a Burn module (a part of the model, e.g. its convolutions) and
/// its forward function from a rank-`I` to a rank-`O` tensor.
///
/// Stages are cheap to build (a module clone shares its tensors): build them from the current
/// model before each step, run the step, and give the gradients of all stages to the model's
/// optimizer (see [`merge_grads`](super::merge_grads)).
pub struct ModuleStage<M, F, const I: usize, const O: usize> {
    name: String,
    model: M,
    forward: F,
    accumulated: GradientsAccumulator<M>,
    device: Device,
    /// This step's deferrable weights (their autodiff nodes) and their parameters.
    deferrable: HashMap<NodeKey, ParamId>,
    /// Weight gradients computed by [`PipelineStage::end_step`], not yet taken.
    deferred: HashMap<ParamId, Vec<f32>>,
}

impl<M, F, const I: usize, const O: usize> ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
{
    /// A stage named `name` running `model` with `forward` on `device`.
    pub fn new(name: impl Into<String>, model: M, forward: F, device: Device) -> Self {
        Self {
            name: name.into(),
            model: own_leaves(model),
            forward,
            accumulated: GradientsAccumulator::new(),
            device,
            deferrable: HashMap::new(),
            deferred: HashMap::new(),
        }
    }

    /// The stage's module.
    pub fn model(&self) -> &M {
        &self.model
    }
}

/// `model` with every parameter a leaf of its own (same id, value and gradient setting):
/// module clones share their parameters' autodiff nodes, so the stages of one model (a tied
/// embedding in the first and the last) or of data-parallel replicas would record into
/// graphs Burn merges, which its graph locks do not survive when the stages' threads run
/// forward and backward passes at the same time (a deadlock seen in `kiln train gpt --mesh
/// dp=2,tp=2,pp=2`, about one run in ten). Gradients stay keyed by parameter id. Any part
/// of a model that a thread of its own trains (a stage, a tensor-parallel rank's part built
/// from a shared model) should go through it.
pub fn own_leaves<M: Module>(model: M) -> M {
    struct Leaves;
    impl burn::module::ModuleMapper for Leaves {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<D>>,
        ) -> burn::module::Param<Tensor<D>> {
            let require_grad = param.is_require_grad();
            param.map(|tensor| match require_grad {
                true => tensor.detach().require_grad(),
                false => tensor.detach(),
            })
        }
    }
    model.map(&mut Leaves)
}

impl<M, F, const I: usize, const O: usize> PipelineStage for ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
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
        self.model.visit(&mut check);
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
        if !(2..=4).contains(&O) {
            return Err(MultiError::Pipeline {
                stage,
                reason: format!(
                    "stage '{}' produces rank-{O} output, which a pipeline cannot carry (ranks 2 to 4)",
                    self.name
                ),
            });
        }
        // A const-generic rank cannot be renamed: with I == R matched here, reshaping to the
        // tensor's own dimensions is the identity (a view), typed as `Tensor<I>`.
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
        Ok(output)
    }

    fn accumulate(&mut self, mut grads: Gradients) {
        let params = GradientsParams::from_module(&mut grads, &self.model);
        self.accumulated.accumulate(&self.model, params);
    }

    fn begin_step(&mut self, micro_batches: usize) {
        /// The rank-4 (convolution weight) parameters tracked on Flex.
        struct Weights(HashMap<NodeKey, ParamId>);
        impl ModuleVisitor for Weights {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if D == 4
                    && let Some(key) = step::node_key(&param.val())
                {
                    self.0.insert(key, param.id);
                }
            }
        }
        let mut weights = Weights(HashMap::new());
        self.model.visit(&mut weights);
        step::start(weights.0.keys().copied(), micro_batches);
        self.deferrable = weights.0;
    }

    fn end_step(&mut self) -> usize {
        let finished = step::finish();
        let count = finished.len();
        for (key, values) in finished {
            if let Some(&id) = self.deferrable.get(&key) {
                self.deferred.insert(id, values);
            }
        }
        self.deferrable.clear();
        count
    }

    fn abort_step(&mut self) {
        step::discard();
        self.deferrable.clear();
        self.deferred.clear();
    }

    fn take_grads(&mut self) -> GradientsParams {
        /// Adds the deferred weight gradients to the summed ones.
        struct AddDeferred<'a> {
            deferred: &'a mut HashMap<ParamId, Vec<f32>>,
            grads: GradientsParams,
        }
        impl ModuleVisitor for AddDeferred<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(values) = self.deferred.remove(&param.id) else {
                    return;
                };
                let device = param.lazy_device().without_autodiff();
                let data = TensorData::new(values, param.lazy_shape());
                let deferred = Tensor::<D>::from_data(data, &device);
                let sum = match self.grads.remove::<D>(param.id) {
                    Some(grad) => grad + deferred,
                    None => deferred,
                };
                self.grads.register(param.id, sum);
            }
        }
        let grads = self.accumulated.grads();
        if self.deferred.is_empty() {
            return grads;
        }
        let mut add = AddDeferred {
            deferred: &mut self.deferred,
            grads,
        };
        self.model.visit(&mut add);
        let grads = add.grads;
        self.deferred.clear();
        grads
    }
}

impl<M, F, const I: usize, const O: usize> ModuleStage<M, F, I, O>
where
    M: Module,
    F: Fn(&M, Tensor<I>) -> Tensor<O> + Send,
{
    /// The forward pass, its output wrapped by rank (`O` is checked to be 2 to 4 first).
    fn run(&self, input: Tensor<I>) -> Activation {
        let output = (self.forward)(&self.model, input);
        match O {
            2 => {
                let dims = x_dims::<O, 2>(&output);
                Activation::Rank2(output.reshape(dims))
            }
            3 => {
                let dims = x_dims::<O, 3>(&output);
                Activation::Rank3(output.reshape(dims))
            }
            _ => {
                let dims = x_dims::<O, 4>(&output);
                Activation::Rank4(output.reshape(dims))
            }
        }
    }
}

/// `x`'s dimensions as an array of length `N`; the caller has matched `R == N`.
fn x_dims<const R: usize, const N: usize>(x: &Tensor<R>) -> [usize; N] {
    x.dims()
        .as_slice()
        .try_into()
        .expect("ranks were matched by the caller")
}
