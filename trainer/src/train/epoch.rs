//! The one epoch loop of the workspace.

use std::num::NonZeroUsize;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use kiln_multi::{Collective, DistributedDataParallel, ZeroOptimizer};

use crate::config::LrGroup;
use crate::error::Result;
use crate::optim::LrSchedule;
use crate::optim::grads::{clip_to, global_norm, scale};
use crate::report::Progress;
use crate::report::tensorboard::EventWriter;
use crate::step::{Metric, MetricSums};
use crate::stop::StopSignal;

/// One micro-batch's loss, metrics and gradients.
pub(crate) struct StepGrads {
    /// The loss value (the mean over `items`).
    pub(crate) loss: f64,
    /// Items the loss averages over.
    pub(crate) items: usize,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) grads: GradientsParams,
    /// Through a pipeline: the step's measured bubble fraction.
    pub(crate) bubble: Option<f64>,
}

/// How a rank computes a micro-batch's loss and gradients: its model's step and backward on
/// one device, or a pipeline of stages.
pub(crate) type GradSource<'a, M, B> = dyn Fn(&M, B) -> Result<StepGrads> + Sync + 'a;

/// Builds the batch of the samples at some indices (this epoch's augmentation included).
pub(crate) type MakeBatch<'a, B> = dyn Fn(&[usize]) -> Result<B> + 'a;

/// What turns a micro-batch sequence into optimizer steps.
#[derive(Clone, Copy)]
pub(crate) struct StepPolicy<'a> {
    /// The base learning rate.
    pub(crate) lr: f64,
    pub(crate) schedule: LrSchedule,
    /// Learning rates of parameter groups (replicated optimizers only), scaled by the
    /// schedule as the base rate is.
    pub(crate) lr_groups: &'a [LrGroup],
    /// Clip the synchronised gradient to this global L2 norm.
    pub(crate) clip_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step; their gradients are averaged.
    pub(crate) accumulation: NonZeroUsize,
    /// Run each micro-batch's forward and backward, and each optimizer step, on a thread of
    /// the kernels' pool ([`kiln_kernels::on_pool`]): one rank alone on the CPU, whose steps
    /// wait on nothing but the pool. Off for ranks of a group (a collective would hold the
    /// pool thread) and for pipelines (their stages have pools of their own).
    pub(crate) on_pool: bool,
}

impl<'a> StepPolicy<'a> {
    /// The policy `config` sets.
    pub(crate) fn of(config: &'a crate::config::TrainerConfig) -> Self {
        Self {
            lr: config.lr,
            schedule: config.schedule,
            lr_groups: &config.lr_groups,
            clip_grad_norm: config.clip_grad_norm,
            accumulation: config.accumulation_steps,
            on_pool: false,
        }
    }
}

/// `f` on a thread of the kernels' pool when `pool`, else on this thread.
fn run_on<R: Send>(pool: bool, f: impl FnOnce() -> R + Send) -> R {
    if pool { kiln_kernels::on_pool(f) } else { f() }
}

/// What an epoch has measured so far. It is carried from one stretch of the epoch to the next
/// (a mid-epoch checkpoint ends a stretch) and saved in mid-epoch checkpoints, so that a
/// resumed epoch reports exactly what an uninterrupted one does.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct EpochProgress {
    /// This rank's loss and metrics over its micro-batches.
    pub(crate) sums: MetricSums,
    /// Optimizer steps done in this epoch.
    pub(crate) steps: u64,
    /// Samples this rank trained on.
    pub(crate) samples: usize,
    pub(crate) seconds: f64,
    /// Through a pipeline: the bubble fractions of the steps, summed, and their number.
    pub(crate) bubbles: (f64, usize),
    /// Seconds spent exchanging gradients (and, under ZeRO, in the sharded update with its
    /// all-gather); 0 on one device.
    pub(crate) exchange_seconds: f64,
}

impl EpochProgress {
    /// The mean bubble fraction of the steps, through a pipeline.
    pub(crate) fn bubble(&self) -> Option<f64> {
        (self.bubbles.1 > 0).then(|| self.bubbles.0 / self.bubbles.1 as f64)
    }
}

/// Optimizer steps between two agreements of a group's ranks on a stop request.
const STOP_CHECK_EVERY: u64 = 4;

/// Why a stretch of an epoch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StretchEnd {
    /// Every batch of the epoch is done.
    EpochDone,
    /// The step of a mid-epoch checkpoint (`--checkpoint-every`) is reached.
    Checkpoint,
    /// The ranks agreed to stop (this signal asked them to).
    Stop(i32),
}

/// Where a stretch of an epoch pauses: at a global step, or when asked to stop (checked after
/// every optimizer step, agreed over `group`).
pub(crate) struct Stretch<'a> {
    pub(crate) until_step: Option<u64>,
    pub(crate) stop: Option<(&'a StopSignal, Option<&'a dyn Collective>)>,
}

/// What an epoch reports as it goes: the progress bar, and on the reporting rank the
/// TensorBoard scalars of every optimizer step.
pub(crate) struct EpochReport<'a> {
    pub(crate) progress: &'a Progress,
    pub(crate) events: Option<&'a mut EventWriter>,
}

/// What one optimizer step did, besides updating the model.
struct StepDone {
    /// The global L2 norm of the synchronised gradient, before clipping, where it was
    /// computed: always on replicated optimizers when scalars are logged; under ZeRO when
    /// clipping.
    grad_norm: Option<f64>,
    /// Seconds in the gradient exchange.
    exchange_seconds: f64,
}

/// How a tensor-parallel rank measures the whole model's gradient norm: the squares of its
/// split parameters' gradients summed over the group, those of the replicated ones (the same
/// on every rank) counted once.
pub(crate) struct SplitNorm {
    pub(crate) collective: std::sync::Arc<dyn kiln_multi::Collective>,
    pub(crate) split: std::collections::HashSet<burn::module::ParamId>,
}

impl SplitNorm {
    fn norm<M: Module>(&self, model: &M, grads: &GradientsParams) -> Result<f64> {
        let (split, replicated) = crate::optim::grads::squares_by(model, grads, &self.split);
        let mut total = [split];
        kiln_multi::all_reduce_sum_f64(&*self.collective, &mut total)?;
        Ok((total[0] + replicated).sqrt())
    }
}

/// How a rank turns its gradients into the next parameters.
pub(crate) enum Updater<'a> {
    /// Every rank holds the whole optimizer state of its model (or part); with `ddp`,
    /// gradients are first averaged with the other ranks'; with `split_norm`, the norm that
    /// clipping uses is the tensor-parallel group's.
    Replicated {
        optimizer: &'a mut ModuleOptimizer,
        ddp: Option<&'a mut DistributedDataParallel>,
        split_norm: Option<&'a SplitNorm>,
    },
    /// The optimizer state is split over the ranks (ZeRO).
    Sharded(&'a mut ZeroOptimizer),
}

impl Updater<'_> {
    /// `model` with the hooks that overlap data parallelism's all-reduce with backward, when
    /// this rank synchronises through DDP with overlap on (see
    /// [`DistributedDataParallel::hook`]).
    fn hook<M: Module>(&mut self, model: &M) -> Option<M> {
        match self {
            Updater::Replicated { ddp: Some(ddp), .. } => ddp.hook(model),
            _ => None,
        }
    }

    fn world(&self) -> usize {
        match self {
            Updater::Replicated { ddp: None, .. } => 1,
            Updater::Replicated { ddp: Some(ddp), .. } => ddp.collective().world_size().get(),
            Updater::Sharded(zero) => zero.collective().world_size().get(),
        }
    }

    /// One optimizer step at learning rate `lr` (groups at theirs times `factor`), the
    /// synchronised gradient clipped to `clip` first; with `want_norm`, the gradient's norm
    /// is measured even without clipping (replicated optimizers).
    fn step<M: Module>(
        &mut self,
        (lr, factor): (f64, f64),
        policy: &StepPolicy<'_>,
        (model, grads): (M, GradientsParams),
        want_norm: bool,
    ) -> Result<(M, StepDone)> {
        let start = Instant::now();
        let (model, grad_norm, exchange) = match self {
            Updater::Replicated {
                optimizer,
                ddp,
                split_norm,
            } => {
                let grads = match ddp {
                    Some(ddp) => ddp.sync(&model, grads)?,
                    None => grads,
                };
                let exchange = if ddp.is_some() {
                    start.elapsed().as_secs_f64()
                } else {
                    0.0
                };
                // A tensor-parallel group measures its norm together, on every step (the
                // reporting rank alone wants it for its scalars).
                let norm = match (policy.clip_grad_norm.is_some() || want_norm, split_norm) {
                    (_, Some(split)) => Some(split.norm(&model, &grads)?),
                    (true, None) => Some(global_norm(&model, &grads)),
                    (false, None) => None,
                };
                let grads = match (policy.clip_grad_norm, norm) {
                    (Some(max), Some(norm)) => clip_to(&model, grads, norm, max),
                    _ => grads,
                };
                let mut model = model;
                for (lr, grads) in split_by_group(&model, grads, lr, factor, policy.lr_groups) {
                    if !grads.is_empty() {
                        model = optimizer.step(lr, model, grads);
                    }
                }
                (model, norm, exchange)
            }
            Updater::Sharded(zero) => {
                let (model, norm) = zero.step_clipped(lr, model, grads, policy.clip_grad_norm)?;
                (model, norm, start.elapsed().as_secs_f64())
            }
        };
        let done = StepDone {
            grad_norm,
            exchange_seconds: exchange,
        };
        Ok((model, done))
    }
}

/// Splits `grads` by learning-rate group: `(lr, the rest)` first, then one entry per group
/// at the group's rate times `factor`. One optimizer step per entry updates every parameter
/// once, each with its own rate (the optimizer keeps its state per parameter).
fn split_by_group<M: Module>(
    model: &M,
    grads: GradientsParams,
    lr: f64,
    factor: f64,
    groups: &[LrGroup],
) -> Vec<(f64, GradientsParams)> {
    if groups.is_empty() {
        return vec![(lr, grads)];
    }
    struct Splitter<'a> {
        path: Vec<String>,
        groups: &'a [LrGroup],
        rest: GradientsParams,
        out: Vec<GradientsParams>,
    }
    impl ModuleVisitor for Splitter<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            if let Some(i) = self.groups.iter().position(|g| path.starts_with(&g.prefix))
                && let Some(grad) = self.rest.remove::<D>(param.id)
            {
                self.out[i].register::<D>(param.id, grad);
            }
        }
    }
    let mut splitter = Splitter {
        path: Vec::new(),
        groups,
        rest: grads,
        out: groups.iter().map(|_| GradientsParams::new()).collect(),
    };
    model.visit(&mut splitter);
    std::iter::once((lr, splitter.rest))
        .chain(groups.iter().map(|g| g.lr * factor).zip(splitter.out))
        .collect()
}

/// Runs the rest of a pass over `order` in micro-batches of `batch_size`, from the group after
/// the `progress.steps` already done: every `accumulation` of them (fewer at the end of the
/// epoch) make one optimizer step on their averaged gradients, through `updater`, at the
/// scheduled rate of step `first_step + k` (`first_step`: the run's steps before this epoch).
/// Stops at the end of the epoch or as `stretch` says, with `progress` updated. The progress
/// bar shows this rank's loss and the throughput of all ranks together.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_epoch<M: Module + Sync, B: Send>(
    mut model: M,
    make_batch: &MakeBatch<'_, B>,
    source: &GradSource<'_, M, B>,
    mut updater: Updater<'_>,
    (order, batch_size): (&[usize], usize),
    policy: &StepPolicy<'_>,
    first_step: u64,
    report: EpochReport<'_>,
    (progress, stretch): (&mut EpochProgress, Stretch<'_>),
) -> Result<(M, StretchEnd)> {
    let EpochReport {
        progress: bar,
        mut events,
    } = report;
    let world = updater.world();
    let (start, seconds_before) = (Instant::now(), progress.seconds);
    let elapsed = |start: Instant| seconds_before + start.elapsed().as_secs_f64();
    let mut accumulator = GradientsAccumulator::new();
    let mut groups = order
        .chunks(batch_size * policy.accumulation.get())
        .skip(progress.steps as usize)
        .peekable();
    while let Some(group) = groups.next() {
        let micro = group.len().div_ceil(batch_size);
        let mut group_loss = 0.0;
        for chunk in group.chunks(batch_size) {
            // With data parallelism, one micro-batch a step: the all-reduce overlaps backward.
            let hooked = (micro == 1).then(|| updater.hook(&model)).flatten();
            let (stepped, batch) = (hooked.as_ref().unwrap_or(&model), make_batch(chunk)?);
            let out = run_on(policy.on_pool, || source(stepped, batch))?;
            progress.sums.add(out.loss, out.items, &out.metrics);
            group_loss += out.loss / micro as f64;
            if let Some(bubble) = out.bubble {
                progress.bubbles = (progress.bubbles.0 + bubble, progress.bubbles.1 + 1);
            }
            accumulator.accumulate(&model, out.grads);
            progress.samples += chunk.len();
            let speed = (progress.samples * world) as f64 / elapsed(start).max(1e-9);
            bar.batch_done(out.loss, speed);
        }
        let grads = accumulator.grads();
        let grads = if micro > 1 {
            scale(&model, grads, 1.0 / micro as f64)
        } else {
            grads
        };
        let step = first_step + progress.steps;
        let lr = policy.schedule.lr(policy.lr, step);
        let record_norm = events.is_some();
        let (updated, done) = run_on(policy.on_pool, || {
            updater.step((lr, lr / policy.lr), policy, (model, grads), record_norm)
        })?;
        model = updated;
        progress.exchange_seconds += done.exchange_seconds;
        progress.steps += 1;
        progress.seconds = elapsed(start);
        if let Some(events) = events.as_deref_mut() {
            let speed = (progress.samples * world) as f64 / progress.seconds.max(1e-9);
            write_step_scalars(events, step + 1, (group_loss, lr, done.grad_norm, speed))?;
        }
        let more = groups.peek().is_some();
        // Ranks agree on a stop every few steps (an all-reduce each time costs a few percent
        // of a small model's step), and always at the end of the epoch.
        let agree_now = |group: Option<&dyn Collective>| {
            group.is_none()
                || !more
                || (first_step + progress.steps).is_multiple_of(STOP_CHECK_EVERY)
        };
        if let Some((signal, group)) = stretch.stop
            && agree_now(group)
            && let Some(signal) = signal.agreed(group)?
        {
            return Ok((model, StretchEnd::Stop(signal)));
        }
        if more && stretch.until_step == Some(first_step + progress.steps) {
            return Ok((model, StretchEnd::Checkpoint));
        }
    }
    Ok((model, StretchEnd::EpochDone))
}

/// The TensorBoard scalars of optimizer step `step`: loss, rate, gradient norm, samples/s.
fn write_step_scalars(
    events: &mut EventWriter,
    step: u64,
    (loss, lr, grad_norm, speed): (f64, f64, Option<f64>, f64),
) -> Result<()> {
    events.scalar("loss/train_step", step, loss)?;
    events.scalar("optimizer/lr", step, lr)?;
    if let Some(norm) = grad_norm {
        events.scalar("optimizer/grad_norm", step, norm)?;
    }
    events.scalar("speed/samples_per_sec_step", step, speed)
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;

    use super::*;
    use crate::optim::OptimizerConfig;

    #[derive(Module, Debug)]
    struct Two {
        a: Linear,
        b: Linear,
    }

    fn values(linear: &Linear) -> Vec<f32> {
        linear.weight.val().into_data().iter::<f32>().collect()
    }

    #[test]
    fn each_group_steps_with_its_own_learning_rate() {
        let device = Device::flex().autodiff();
        let model = Two {
            a: LinearConfig::new(3, 2).init(&device),
            b: LinearConfig::new(2, 1).init(&device),
        };
        let x = Tensor::<2>::ones([4, 3], &device);
        let loss = model.b.forward(model.a.forward(x)).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grad = |id| -> Vec<f32> {
            grads
                .get::<2>(id)
                .unwrap()
                .into_data()
                .iter::<f32>()
                .collect()
        };
        let (ga, gb) = (grad(model.a.weight.id), grad(model.b.weight.id));
        let (a0, b0) = (values(&model.a), values(&model.b));
        let mut optimizer = OptimizerConfig::default().build();
        let mut updater = Updater::Replicated {
            optimizer: &mut optimizer,
            ddp: None,
            split_norm: None,
        };
        let groups = [LrGroup {
            prefix: "b.".into(),
            lr: 0.5,
        }];
        let policy = StepPolicy {
            lr: 0.1,
            schedule: LrSchedule::Constant,
            lr_groups: &groups,
            clip_grad_norm: None,
            accumulation: NonZeroUsize::MIN,
            on_pool: false,
        };
        // The schedule halved both rates for this step.
        let (stepped, _) = updater
            .step((0.05, 0.5), &policy, (model, grads), false)
            .unwrap();
        // First SGD-momentum step: p -= lr * g.
        for ((new, old), g) in values(&stepped.a).iter().zip(&a0).zip(&ga) {
            assert!((new - (old - 0.05 * g)).abs() < 1e-6);
        }
        for ((new, old), g) in values(&stepped.b).iter().zip(&b0).zip(&gb) {
            assert!((new - (old - 0.25 * g)).abs() < 1e-6);
        }
    }
}
