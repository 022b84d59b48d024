//! Runs a training step through the stages of a pipeline, one thread per stage.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor};

use super::schedule::{PipelineOp, PipelineSchedule, peak_in_flight};
use super::stage::{Activation, PipelineStage};
use crate::collective::shard_range;
use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// How a [`Pipeline`] runs its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// The order of forward and backward passes.
    pub schedule: PipelineSchedule,
    /// Micro-batches per batch (the naive schedule uses one).
    pub micro_batches: NonZeroUsize,
    /// How long a stage waits for a neighbour's activation or gradient before failing.
    pub timeout: Duration,
    /// Threads each stage's kernels may use, in a thread pool of its own (like one device per
    /// stage); `None` lets all stages share the global pool.
    pub threads_per_stage: Option<NonZeroUsize>,
    /// With more than one micro-batch, let stages defer the weight gradients of layers whose
    /// weights outweigh their activations to the end of the step, computed once over the whole
    /// batch instead of per micro-batch and summed ([`PipelineStage::begin_step`]; for
    /// [`ModuleStage`](super::ModuleStage), kiln's CPU convolutions, see
    /// `kiln_kernels::step`). The same gradients up to float rounding; `true` is the
    /// faster choice, `false` runs every micro-batch's backward pass in full.
    pub defer_weight_gradients: bool,
}

/// What one training step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The batch's mean loss.
    pub loss: f64,
    /// Micro-batches the batch was split into.
    pub micro_batches: usize,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    /// Seconds each stage spent computing (forward and backward passes).
    pub busy_seconds: Vec<f64>,
    /// The most micro-batch activations each stage held at once.
    pub peak_in_flight: Vec<usize>,
    /// Parameters per stage whose gradient was deferred to the end of the step
    /// ([`PipelineConfig::defer_weight_gradients`]).
    pub deferred_gradients: Vec<usize>,
}

impl StepReport {
    /// Fraction of stage-time spent idle: `1 - sum(busy) / (stages * wall time)`.
    pub fn bubble_fraction(&self) -> f64 {
        let busy: f64 = self.busy_seconds.iter().sum();
        let capacity = self.busy_seconds.len() as f64 * self.seconds;
        if capacity > 0.0 {
            (1.0 - busy / capacity).max(0.0)
        } else {
            0.0
        }
    }
}

/// Runs training steps of a model split into stages, each on its own device and thread, with
/// micro-batches (Burn has no pipeline parallelism of its own).
///
/// Each stage keeps its own autodiff graph: its input is a detached leaf that requires a
/// gradient; backward starts from the gradient received from the next stage
/// (`(output * grad).sum().backward()`) and sends the input's gradient to the previous one.
/// Gradients add up over the micro-batches in each stage; [`merge_grads`] then gives them to
/// the model's optimizer, so a step equals one step of the whole model on the whole batch.
pub struct Pipeline {
    config: PipelineConfig,
    pools: Vec<rayon::ThreadPool>,
}

impl Pipeline {
    /// A pipeline runner; with `threads_per_stage`, it starts one thread pool per stage of
    /// `stages`.
    ///
    /// # Errors
    /// [`MultiError::Config`] when a thread pool cannot start.
    pub fn new(stages: NonZeroUsize, config: PipelineConfig) -> Result<Self> {
        let pools = match config.threads_per_stage {
            None => Vec::new(),
            Some(threads) => (0..stages.get())
                .map(|index| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads.get())
                        .thread_name(move |t| format!("kiln-stage-{index}-{t}"))
                        .build()
                        .map_err(|e| MultiError::Config {
                            field: "threads per stage",
                            reason: e.to_string(),
                        })
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self { config, pools })
    }

    /// The configuration in use.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The forward and backward passes of one batch: `input` goes to the first stage, the last
    /// stage's output (logits `[batch, classes]`, or `[batch, tokens, vocabulary]` for
    /// [`Targets::Tokens`]) is scored against `targets` with the mean cross-entropy, and every stage accumulates its parameters' gradients (collect them with
    /// [`PipelineStage::take_grads`] or [`merge_grads`]). Placement is checked first.
    ///
    /// # Errors
    /// [`MultiError::Placement`] for a parameter on another device than its stage; a stage
    /// that fails (wrong activation rank, panic) or waits longer than the timeout; the error
    /// names the stage where it started.
    pub fn run(
        &self,
        stages: &mut [Box<dyn PipelineStage>],
        input: Activation,
        targets: impl Into<Targets>,
    ) -> Result<StepReport> {
        let targets = targets.into();
        let p = NonZeroUsize::new(stages.len()).ok_or_else(|| MultiError::Config {
            field: "pipeline stages",
            reason: "a pipeline needs at least one stage".to_string(),
        })?;
        if !self.pools.is_empty() && self.pools.len() != p.get() {
            return Err(MultiError::Config {
                field: "pipeline stages",
                reason: format!(
                    "the pipeline was built for {} stages, got {}",
                    self.pools.len(),
                    p.get()
                ),
            });
        }
        for (index, stage) in stages.iter().enumerate() {
            stage.validate_placement(index)?;
        }
        let batch = input.batch_len();
        let requested = self
            .config
            .schedule
            .micro_batches(self.config.micro_batches);
        let micro = NonZeroUsize::new(requested.get().min(batch)).unwrap_or(NonZeroUsize::MIN);
        let world = WorldSize::new(micro.get())?;
        let ranges: Vec<_> = (0..micro.get())
            .map(|i| shard_range(batch, world, Rank::new(i, world).expect("i < micro")))
            .collect();
        let inputs: Vec<Activation> = ranges
            .iter()
            .map(|r| input.clone().narrow_batch(r.start, r.len()))
            .collect();
        let micro_targets: Vec<(Targets, f64)> = ranges
            .iter()
            .map(|r| {
                let scale = r.len() as f64 / batch.max(1) as f64;
                (targets.clone().narrow_batch(r.start, r.len()), scale)
            })
            .collect();

        let p = p.get();
        let (mut forward_tx, mut forward_rx) = (Vec::new(), Vec::new());
        let (mut backward_tx, mut backward_rx) = (Vec::new(), Vec::new());
        for _ in 1..p {
            let (tx, rx) = channel();
            forward_tx.push(Some(tx));
            forward_rx.push(Some(rx));
            let (tx, rx) = channel();
            backward_tx.push(Some(tx));
            backward_rx.push(Some(rx));
        }
        let start = Instant::now();
        let timeout = self.config.timeout;
        let schedule = self.config.schedule;
        let stage_count = NonZeroUsize::new(p).expect("checked above");
        let outcomes: Vec<std::thread::Result<Result<StageOutcome>>> =
            std::thread::scope(|scope| {
                let mut threads = Vec::new();
                for (index, stage) in stages.iter_mut().enumerate() {
                    let links = Links {
                        // Stage s receives activations on link s-1 and sends on link s.
                        forward_in: index.checked_sub(1).and_then(|l| forward_rx[l].take()),
                        forward_out: forward_tx.get_mut(index).and_then(Option::take),
                        backward_in: backward_rx.get_mut(index).and_then(Option::take),
                        backward_out: index.checked_sub(1).and_then(|l| backward_tx[l].take()),
                    };
                    let job = StageJob {
                        index,
                        last: index + 1 == p,
                        ops: schedule.stage_ops(stage_count, index, micro),
                        inputs: if index == 0 {
                            inputs.clone()
                        } else {
                            Vec::new()
                        },
                        targets: if index + 1 == p {
                            micro_targets.clone()
                        } else {
                            Vec::new()
                        },
                        timeout,
                        defer: self.config.defer_weight_gradients && micro.get() > 1,
                    };
                    let pool = self.pools.get(index);
                    threads.push(scope.spawn(move || match pool {
                        Some(pool) => pool.install(|| run_stage(stage.as_mut(), job, links)),
                        None => run_stage(stage.as_mut(), job, links),
                    }));
                }
                threads.into_iter().map(|t| t.join()).collect()
            });
        let seconds = start.elapsed().as_secs_f64();

        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (index, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(Ok(result)) => results.push(result),
                Ok(Err(e)) => errors.push(e),
                Err(payload) => errors.push(MultiError::RankPanicked {
                    rank: index,
                    message: payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(non-string panic payload)".to_string()),
                }),
            }
        }
        // A stage that failed makes its neighbours see a closed channel; report the cause.
        if !errors.is_empty() {
            let cause = errors
                .iter()
                .position(|e| !matches!(e, MultiError::PeerFailed { .. }))
                .unwrap_or(0);
            return Err(errors.swap_remove(cause));
        }
        Ok(StepReport {
            loss: results.iter().map(|r| r.loss).sum(),
            micro_batches: micro.get(),
            seconds,
            busy_seconds: results.iter().map(|r| r.busy).collect(),
            peak_in_flight: results.iter().map(|r| r.peak_in_flight).collect(),
            deferred_gradients: results.iter().map(|r| r.deferred).collect(),
        })
    }
}

/// What the last stage's output is scored against with the cross-entropy.
#[derive(Debug, Clone)]
pub enum Targets {
    /// One class per sample, `[batch]`: the output is logits `[batch, classes]`.
    Classes(Tensor<1, Int>),
    /// One token per position, `[batch, tokens]` (a language model's next tokens): the output
    /// is logits `[batch, tokens, vocabulary]`, and the loss their mean over every position.
    Tokens(Tensor<2, Int>),
}

impl Targets {
    /// Targets the loss averages over: samples, or samples times positions.
    pub fn count(&self) -> usize {
        match self {
            Targets::Classes(t) => t.dims()[0],
            Targets::Tokens(t) => t.dims().iter().product(),
        }
    }

    fn narrow_batch(self, start: usize, len: usize) -> Self {
        match self {
            Targets::Classes(t) => Targets::Classes(t.narrow(0, start, len)),
            Targets::Tokens(t) => Targets::Tokens(t.narrow(0, start, len)),
        }
    }
}

impl From<Tensor<1, Int>> for Targets {
    fn from(classes: Tensor<1, Int>) -> Self {
        Targets::Classes(classes)
    }
}

impl From<Tensor<2, Int>> for Targets {
    fn from(tokens: Tensor<2, Int>) -> Self {
        Targets::Tokens(tokens)
    }
}

/// The last stage's logits and targets as the cross-entropy takes them: `[n, classes]` and
/// `[n]`.
fn scored(
    output: Activation,
    targets: Targets,
    stage: usize,
) -> Result<(Tensor<2>, Tensor<1, Int>)> {
    match (output, targets) {
        (Activation::Rank2(logits), Targets::Classes(classes)) => Ok((logits, classes)),
        (Activation::Rank3(logits), Targets::Tokens(tokens)) => {
            let [b, t, v] = logits.dims();
            Ok((logits.reshape([b * t, v]), tokens.reshape([b * t])))
        }
        (output, targets) => Err(MultiError::Pipeline {
            stage,
            reason: format!(
                "the last stage must output logits [batch, classes] for class targets or \
                 [batch, tokens, vocabulary] for token targets, got rank {} for {}",
                output.rank(),
                match targets {
                    Targets::Classes(_) => "class targets",
                    Targets::Tokens(_) => "token targets",
                }
            ),
        }),
    }
}

/// The gradients of every stage as one [`GradientsParams`] for `model`'s optimizer, each moved
/// to its parameter's device (summed over the stages that share a parameter, e.g. tied
/// weights). The stages must have been built from `model`'s parameters (same ids); their sums
/// start again from zero.
pub fn merge_grads<M: Module>(model: &M, stages: &mut [Box<dyn PipelineStage>]) -> GradientsParams {
    struct Merge {
        parts: Vec<GradientsParams>,
        merged: GradientsParams,
    }
    impl ModuleVisitor for Merge {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // A parameter shared by several stages (tied weights) gets the sum of their parts.
            let device = param.lazy_device().without_autodiff();
            let sum = self
                .parts
                .iter_mut()
                .filter_map(|p| p.remove::<D>(param.id))
                .map(|grad| grad.to_device(&device))
                .reduce(|sum, grad| sum + grad);
            if let Some(sum) = sum {
                self.merged.register(param.id, sum);
            }
        }
    }
    let mut merge = Merge {
        parts: stages.iter_mut().map(|s| s.take_grads()).collect(),
        merged: GradientsParams::new(),
    };
    model.visit(&mut merge);
    merge.merged
}

/// A stage's channels to its neighbours (`None` at the ends of the pipeline).
struct Links {
    forward_in: Option<Receiver<(usize, Activation)>>,
    forward_out: Option<Sender<(usize, Activation)>>,
    backward_in: Option<Receiver<(usize, Activation)>>,
    backward_out: Option<Sender<(usize, Activation)>>,
}

struct StageJob {
    index: usize,
    last: bool,
    ops: Vec<PipelineOp>,
    /// Micro-batch inputs (first stage only).
    inputs: Vec<Activation>,
    /// Micro-batch targets and loss weights (last stage only).
    targets: Vec<(Targets, f64)>,
    timeout: Duration,
    /// Whether the stage may defer work to the end of the step.
    defer: bool,
}

struct StageOutcome {
    loss: f64,
    busy: f64,
    peak_in_flight: usize,
    deferred: usize,
}

/// What a stage keeps of a micro-batch between its forward and backward passes.
struct Stash {
    input: Activation,
    output: Produced,
}

/// The end of a stage's graph for one micro-batch, where its backward starts.
enum Produced {
    /// An intermediate stage's output: backward starts from the next stage's gradient.
    Activation(Activation),
    /// The last stage's weighted loss: backward starts here.
    Loss(Tensor<1>),
}

fn receive(
    rx: Option<&Receiver<(usize, Activation)>>,
    job: &StageJob,
    expected: usize,
    what: &str,
    from: usize,
) -> Result<Activation> {
    let rx = rx.ok_or_else(|| MultiError::Pipeline {
        stage: job.index,
        reason: format!("no channel for the {what} of micro-batch {expected}"),
    })?;
    match rx.recv_timeout(job.timeout) {
        Ok((index, value)) if index == expected => Ok(value),
        Ok((index, _)) => Err(MultiError::Pipeline {
            stage: job.index,
            reason: format!("expected the {what} of micro-batch {expected}, got {index}"),
        }),
        Err(RecvTimeoutError::Timeout) => Err(MultiError::Pipeline {
            stage: job.index,
            reason: format!(
                "waited {:?} for the {what} of micro-batch {expected} from stage {from}",
                job.timeout
            ),
        }),
        Err(RecvTimeoutError::Disconnected) => Err(MultiError::PeerFailed {
            rank: job.index,
            op: "pipeline step",
            reason: format!(
                "stage {from} stopped before sending the {what} of micro-batch {expected}"
            ),
        }),
    }
}

fn send(
    tx: Option<&Sender<(usize, Activation)>>,
    job: &StageJob,
    micro: usize,
    value: Activation,
    to: usize,
) -> Result<()> {
    let Some(tx) = tx else { return Ok(()) };
    tx.send((micro, value)).map_err(|_| MultiError::PeerFailed {
        rank: job.index,
        op: "pipeline step",
        reason: format!("stage {to} stopped before receiving micro-batch {micro}"),
    })
}

/// One stage's part of a step, on the stage's thread: [`run_ops`] between
/// [`PipelineStage::begin_step`] and [`PipelineStage::end_step`] (whose work counts as busy).
fn run_stage(stage: &mut dyn PipelineStage, job: StageJob, links: Links) -> Result<StageOutcome> {
    if !job.defer {
        return run_ops(stage, &job, links);
    }
    let forwards = job
        .ops
        .iter()
        .filter(|op| matches!(op, PipelineOp::Forward(_)))
        .count();
    stage.begin_step(forwards);
    match run_ops(stage, &job, links) {
        Ok(mut outcome) => {
            let began = Instant::now();
            outcome.deferred = stage.end_step();
            outcome.busy += began.elapsed().as_secs_f64();
            Ok(outcome)
        }
        Err(e) => {
            stage.abort_step();
            Err(e)
        }
    }
}

/// The forward and backward passes `job.ops` of one stage.
fn run_ops(stage: &mut dyn PipelineStage, job: &StageJob, links: Links) -> Result<StageOutcome> {
    let device = stage.device().clone();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut stash: BTreeMap<usize, Stash> = BTreeMap::new();
    let (mut loss_total, mut busy) = (0.0f64, Duration::ZERO);
    for &op in &job.ops {
        match op {
            PipelineOp::Forward(i) => {
                let input = match job.inputs.get(i) {
                    Some(x) => x.clone(),
                    None => receive(
                        links.forward_in.as_ref(),
                        job,
                        i,
                        "activation",
                        job.index.wrapping_sub(1),
                    )?
                    .detach_to(&device)
                    .require_grad(),
                };
                let began = Instant::now();
                let output = stage.forward(job.index, input.clone())?;
                let output = if job.last {
                    let (targets, weight) =
                        job.targets
                            .get(i)
                            .cloned()
                            .ok_or_else(|| MultiError::Pipeline {
                                stage: job.index,
                                reason: format!("no targets for micro-batch {i}"),
                            })?;
                    let (logits, targets) = scored(output, targets, job.index)?;
                    let loss = loss_fn
                        .forward(logits, targets.to_device(&device))
                        .mul_scalar(weight);
                    loss_total += loss.clone().into_scalar::<f64>();
                    Produced::Loss(loss)
                } else {
                    send(
                        links.forward_out.as_ref(),
                        job,
                        i,
                        output.clone().detach_to(&device),
                        job.index + 1,
                    )?;
                    Produced::Activation(output)
                };
                busy += began.elapsed();
                stash.insert(i, Stash { input, output });
            }
            PipelineOp::Backward(i) => {
                let kept = stash.remove(&i).ok_or_else(|| MultiError::Pipeline {
                    stage: job.index,
                    reason: format!("backward of micro-batch {i} before its forward"),
                })?;
                let grads = match &kept.output {
                    Produced::Loss(loss) => {
                        let began = Instant::now();
                        let grads = loss.backward();
                        busy += began.elapsed();
                        grads
                    }
                    Produced::Activation(output) => {
                        let grad_out = receive(
                            links.backward_in.as_ref(),
                            job,
                            i,
                            "gradient",
                            job.index + 1,
                        )?;
                        let began = Instant::now();
                        let grads = output.backward_with(grad_out, &device).ok_or_else(|| MultiError::Pipeline {
                            stage: job.index,
                            reason: format!("the gradient of micro-batch {i} has another rank than the activation"),
                        })?;
                        busy += began.elapsed();
                        grads
                    }
                };
                let began = Instant::now();
                if job.index > 0 {
                    let grad_in = kept
                        .input
                        .grad(&grads)
                        .ok_or_else(|| MultiError::Pipeline {
                            stage: job.index,
                            reason: format!("the input of micro-batch {i} got no gradient"),
                        })?;
                    send(links.backward_out.as_ref(), job, i, grad_in, job.index - 1)?;
                }
                stage.accumulate(grads);
                busy += began.elapsed();
            }
        }
    }
    Ok(StageOutcome {
        loss: loss_total,
        busy: busy.as_secs_f64(),
        peak_in_flight: peak_in_flight(&job.ops),
        deferred: 0,
    })
}
