//! Data parallelism against the same computation on one device: N ranks x batch b must give
//! the parameters of 1 rank x batch N*b over the same samples.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_multi::data_parallel::{HostStaged, flatten_params};
use kiln_multi::{
    BucketConfig, Collective, CollectiveConfig, DistributedDataParallel, DistributedSampler,
    DistributedSamplerConfig, FlatOptimizer, MultiError, Rank, WorldSize, ZeroConfig,
    ZeroOptimizer, ZeroStage, run_in_process,
};
use rand::rngs::StdRng;

use crate::common::{device, max_abs_diff, sgd};
use rand::{Rng, SeedableRng};

const FEATURES: usize = 12;
const CLASSES: usize = 5;
const LR: f64 = 0.05;

/// A user's own model: nothing in it knows about data parallelism.
#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    relu: Relu,
    out: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(FEATURES, 32).init(device),
            relu: Relu::new(),
            out: LinearConfig::new(32, CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

struct Data {
    x: Vec<f32>,
    y: Vec<i64>,
}

impl Data {
    fn new(len: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(7);
        let x: Vec<f32> = (0..len * FEATURES)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let y = (0..len)
            .map(|i| {
                let row = &x[i * FEATURES..(i + 1) * FEATURES];
                let score: f32 = row
                    .iter()
                    .enumerate()
                    .map(|(k, v)| v * (k as f32 - 5.5))
                    .sum();
                ((score.abs() * 3.0) as i64).min(CLASSES as i64 - 1)
            })
            .collect();
        Self { x, y }
    }

    /// The samples `indices` as inputs and targets on `device`.
    fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let x: Vec<f32> = indices
            .iter()
            .flat_map(|&i| self.x[i * FEATURES..(i + 1) * FEATURES].iter().copied())
            .collect();
        let y: Vec<i64> = indices.iter().map(|&i| self.y[i]).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [indices.len(), FEATURES]), device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(y, [indices.len()]), device);
        (x, y)
    }

    /// Gradients of the mean cross-entropy over the samples `indices`, scaled by `scale`.
    fn grads(
        &self,
        model: &Mlp,
        indices: &[usize],
        scale: f32,
        device: &Device,
    ) -> GradientsParams {
        let (x, y) = self.batch(indices, device);
        let loss = CrossEntropyLossConfig::new()
            .init(device)
            .forward(model.forward(x), y)
            .mul_scalar(scale);
        GradientsParams::from_grads(loss.backward(), model)
    }
}

/// What one rank ends with.
struct RankResult {
    params: Vec<f32>,
    /// Parameters after one more step with zero gradients: they move by the momentum buffers
    /// alone, so equal probes on equal parameters mean equal optimizer states.
    momentum_probe: Vec<f32>,
    global_batches: Vec<Vec<usize>>,
}

/// `model` with every parameter doubled: a replica that disagrees with rank 0 until the
/// initial broadcast.
fn perturbed(model: &Mlp) -> Mlp {
    struct Double;
    impl ModuleMapper for Double {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| t.mul_scalar(2.0).detach().require_grad())
        }
    }
    model.clone().fork(&device()).map(&mut Double)
}

/// How the ranks keep their replicas in step.
#[derive(Clone, Copy)]
enum Update {
    /// `DistributedDataParallel` with these buckets, and Burn's SGD with momentum on each rank.
    Ddp(BucketConfig),
    /// `ZeroOptimizer` (no micro-batch accumulation).
    Zero(ZeroConfig),
}

impl Update {
    /// Burn's optimizer that one device runs to give the same updates.
    fn single_device_optimizer(self) -> ModuleOptimizer {
        match self {
            Update::Zero(ZeroConfig {
                optimizer: FlatOptimizer::Adam { .. },
                ..
            }) => AdamConfig::new().init(),
            _ => sgd(),
        }
    }
}

/// Trains data-parallel on `world` ranks for `steps` optimizer steps of `micro` micro-batches
/// of `local_batch` samples per rank. Rank 0 starts from `init`; the other ranks start from
/// different values (same parameter ids), which the initial broadcast must overwrite.
fn train_parallel(
    data: &Data,
    init: &Mlp,
    world: usize,
    local_batch: usize,
    micro: usize,
    steps: usize,
    update: Update,
) -> Vec<RankResult> {
    let world = WorldSize::new(world).unwrap();
    let replicas: Vec<Mutex<Option<Mlp>>> = (0..world.get())
        .map(|r| {
            let model = if r == 0 {
                init.clone().fork(&device())
            } else {
                perturbed(init)
            };
            Mutex::new(Some(model))
        })
        .collect();
    let sampler = DistributedSampler::new(
        data.y.len(),
        world,
        DistributedSamplerConfig {
            shuffle: true,
            seed: 3,
            drop_last: false,
        },
    )
    .unwrap();
    let config = CollectiveConfig {
        timeout: Duration::from_secs(60),
    };
    run_in_process(world, config, |collective: Arc<dyn Collective>| {
        let rank = collective.rank();
        let model = replicas[rank.index()].lock().unwrap().take().unwrap();
        let mut step = Stepper::new(model, collective, update)?;
        let mut model = step.take_model();
        let mut batches = Vec::new();
        let mut epoch = 0;
        let mut queue: Vec<usize> = Vec::new();
        for _ in 0..steps {
            let mut step_samples = Vec::new();
            for m in 0..micro {
                if queue.len() < local_batch {
                    queue.extend(sampler.indices(rank, epoch));
                    epoch += 1;
                }
                let batch: Vec<usize> = queue.drain(..local_batch).collect();
                let grads = data.grads(&model, &batch, 1.0 / micro as f32, &device());
                step_samples.extend(batch);
                model = step.step(model, grads, m + 1 == micro)?;
            }
            batches.push(step_samples);
        }
        let params = flatten_params(&model)?;
        let zero = data.grads(&model, &[0, 1], 0.0, &device());
        let probed = step.step(model, zero, true)?;
        Ok::<_, MultiError>(RankResult {
            params,
            momentum_probe: flatten_params(&probed)?,
            global_batches: batches,
        })
    })
    .unwrap()
}

/// One rank's optimizer side: DDP then Burn's optimizer, or ZeRO.
enum Stepper {
    Ddp(DistributedDataParallel, ModuleOptimizer, Option<Mlp>),
    Zero(ZeroOptimizer, Option<Mlp>),
}

impl Stepper {
    fn new(
        model: Mlp,
        collective: Arc<dyn Collective>,
        update: Update,
    ) -> Result<Self, MultiError> {
        Ok(match update {
            Update::Ddp(buckets) => {
                let (model, ddp) = DistributedDataParallel::new(model, collective, buckets)?;
                Stepper::Ddp(ddp, sgd(), Some(model))
            }
            Update::Zero(config) => {
                let (model, zero) = ZeroOptimizer::new(model, collective, config)?;
                Stepper::Zero(zero, Some(model))
            }
        })
    }

    /// The synchronised replica, once.
    fn take_model(&mut self) -> Mlp {
        match self {
            Stepper::Ddp(_, _, model) | Stepper::Zero(_, model) => model.take().unwrap(),
        }
    }

    /// Adds a micro-batch's gradients; with `last`, synchronises and steps.
    fn step(&mut self, model: Mlp, grads: GradientsParams, last: bool) -> Result<Mlp, MultiError> {
        match self {
            Stepper::Ddp(ddp, _, _) if !last => {
                ddp.accumulate(&model, grads)?;
                Ok(model)
            }
            Stepper::Ddp(ddp, optimizer, _) => {
                let grads = ddp.sync(&model, grads)?;
                Ok(optimizer.step(LR, model, grads))
            }
            Stepper::Zero(zero, _) => {
                assert!(last, "ZeroOptimizer takes one micro-batch per step here");
                zero.step(LR, model, grads)
            }
        }
    }
}

/// Trains on one device over the union of the ranks' samples of every step.
fn train_single(data: &Data, init: &Mlp, steps: &[Vec<usize>], update: Update) -> Vec<f32> {
    let mut model = init.clone().fork(&device());
    let mut optimizer = update.single_device_optimizer();
    for batch in steps {
        let grads = data.grads(&model, batch, 1.0, &device());
        model = optimizer.step(LR, model, grads);
    }
    flatten_params(&model).unwrap()
}

/// Checks the ranks agree bit for bit and match one device within `tol`; returns the error.
fn check_against_single_device(
    data: &Data,
    init: &Mlp,
    ranks: &[RankResult],
    update: Update,
    tol: f32,
) -> f32 {
    for r in &ranks[1..] {
        assert_eq!(r.params, ranks[0].params, "replicas diverged");
        assert_eq!(
            r.momentum_probe, ranks[0].momentum_probe,
            "optimizer states diverged"
        );
    }
    let probe_moved = max_abs_diff(&ranks[0].params, &ranks[0].momentum_probe);
    assert!(
        probe_moved > 0.0,
        "the momentum probe cannot tell optimizer states apart"
    );
    let steps: Vec<Vec<usize>> = (0..ranks[0].global_batches.len())
        .map(|s| {
            ranks
                .iter()
                .flat_map(|r| r.global_batches[s].iter().copied())
                .collect()
        })
        .collect();
    let single = train_single(data, init, &steps, update);
    let diff = max_abs_diff(&ranks[0].params, &single);
    let moved = max_abs_diff(&flatten_params(init).unwrap(), &single);
    assert!(
        moved > 1e-2,
        "training barely moved the parameters ({moved})"
    );
    assert!(diff <= tol, "max |delta| {diff} > {tol}");
    diff
}

#[test]
fn two_ranks_of_32_match_one_rank_of_64_for_20_momentum_steps() {
    let data = Data::new(640);
    let init = Mlp::new(&device());
    // Small caps so that the model spans several buckets.
    let buckets = BucketConfig {
        cap_bytes: 1024,
        first_bucket_bytes: 256,
    };
    let update = Update::Ddp(buckets);
    let ranks = train_parallel(&data, &init, 2, 32, 1, 20, update);
    assert!(ranks[0].global_batches.iter().all(|b| b.len() == 32));
    let diff = check_against_single_device(&data, &init, &ranks, update, 1e-5);
    eprintln!("2 x 32 vs 1 x 64, 20 steps: max |delta param| = {diff:e}");
}

#[test]
fn three_ranks_on_a_size_that_does_not_divide_match_one_device() {
    // 100 samples over 3 ranks: the sampler pads to 102; batches of 8 leave a last one of 2.
    let data = Data::new(100);
    let init = Mlp::new(&device());
    let update = Update::Ddp(BucketConfig::default());
    let ranks = train_parallel(&data, &init, 3, 8, 1, 20, update);
    let diff = check_against_single_device(&data, &init, &ranks, update, 1e-5);
    eprintln!("3 x 8 on 100 samples vs 1 x 24, 20 steps: max |delta param| = {diff:e}");
}

#[test]
fn no_sync_accumulation_over_two_micro_batches_matches_one_big_batch() {
    let data = Data::new(640);
    let init = Mlp::new(&device());
    let update = Update::Ddp(BucketConfig::default());
    let ranks = train_parallel(&data, &init, 2, 16, 2, 10, update);
    assert!(ranks[0].global_batches.iter().all(|b| b.len() == 32));
    check_against_single_device(&data, &init, &ranks, update, 1e-5);
}

#[test]
fn buckets_hold_every_trainable_parameter_once_in_reverse_order() {
    let model = Mlp::new(&device());
    let config = CollectiveConfig::default();
    let buckets = run_in_process(WorldSize::ONE, config, |c| {
        let (_, ddp) = DistributedDataParallel::new(
            model.clone(),
            c,
            BucketConfig {
                cap_bytes: 1024,
                first_bucket_bytes: 64,
            },
        )?;
        Ok::<_, MultiError>(ddp.buckets().to_vec())
    })
    .unwrap()
    .remove(0);
    let order: Vec<_> = buckets.iter().flat_map(|b| b.params().to_vec()).collect();
    let registration = [
        model.hidden.weight.id,
        model.hidden.bias.as_ref().unwrap().id,
        model.out.weight.id,
        model.out.bias.as_ref().unwrap().id,
    ];
    let reversed: Vec<_> = registration.iter().rev().copied().collect();
    assert_eq!(order, reversed);
    // out.bias (20 bytes) + out.weight (640 bytes) closes the 64-byte first bucket only after
    // out.weight; hidden.bias (128) + hidden.weight (1536) close the next.
    assert_eq!(buckets.len(), 2);
    let elements: usize = buckets.iter().map(|b| b.elements()).sum();
    assert_eq!(elements, FEATURES * 32 + 32 + 32 * CLASSES + CLASSES);
}

#[test]
fn rank_zero_parameters_reach_every_replica() {
    let init = Mlp::new(&device());
    let want = flatten_params(&init).unwrap();
    let results = run_in_process(
        WorldSize::new(3).unwrap(),
        CollectiveConfig::default(),
        |c| {
            let model = if c.rank() == Rank::ZERO {
                init.clone()
            } else {
                Mlp::new(&device())
            };
            let (model, _) = DistributedDataParallel::new(model, c, BucketConfig::default())?;
            flatten_params(&model)
        },
    )
    .unwrap();
    for params in results {
        assert_eq!(params, want);
    }
}

#[test]
fn frozen_parameters_stay_out_of_the_buckets_and_unfreezing_later_is_an_error() {
    let data = Data::new(64);
    let mut model = Mlp::new(&device());
    model.hidden = model.hidden.freeze();
    let outcome = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (model, mut ddp) =
            DistributedDataParallel::new(model.clone(), c, BucketConfig::default())?;
        let elements: usize = ddp.buckets().iter().map(|b| b.elements()).sum();
        assert_eq!(
            elements,
            32 * CLASSES + CLASSES,
            "only the output layer trains"
        );
        let grads = data.grads(&model, &[0, 1, 2], 1.0, &device());
        let synced = ddp.sync(&model, grads)?;
        assert_eq!(synced.len(), 2);
        // The user unfreezes after the buckets were planned: refused, not silently unsynced.
        let mut unfrozen = model.clone();
        unfrozen.hidden = unfrozen.hidden.set_require_grad(true);
        let grads = data.grads(&unfrozen, &[0, 1, 2], 1.0, &device());
        ddp.sync(&unfrozen, grads).map(|_| ())
    });
    let err = outcome.unwrap_err();
    assert!(
        matches!(&err, MultiError::Tensor { detail, .. } if detail.contains("not trainable")),
        "{err:?}"
    );
}

/// SGD with momentum 0.9, as `common::sgd`.
const SGD_MOMENTUM: FlatOptimizer = FlatOptimizer::sgd_momentum(0.9);

#[test]
fn zero_stages_match_one_device_for_20_steps_with_sgd_momentum_and_adam() {
    let data = Data::new(640);
    let init = Mlp::new(&device());
    for stage in [ZeroStage::One, ZeroStage::Two] {
        for optimizer in [SGD_MOMENTUM, FlatOptimizer::ADAM] {
            // 3 ranks: 2,117 parameters do not split evenly, and shards cut through tensors.
            for (world, local_batch) in [(2, 32), (3, 8)] {
                let update = Update::Zero(ZeroConfig { stage, optimizer });
                let ranks = train_parallel(&data, &init, world, local_batch, 1, 20, update);
                let diff = check_against_single_device(&data, &init, &ranks, update, 1e-5);
                eprintln!(
                    "ZeRO-{} {} {world} x {local_batch}, 20 steps: max |delta param| = {diff:e}",
                    stage.number(),
                    optimizer.name()
                );
            }
        }
    }
}

#[test]
fn zero_keeps_a_shard_of_the_state_and_its_checkpoint_resumes_on_another_world_size() {
    let data = Data::new(640);
    let init = Mlp::new(&device());
    let total = FEATURES * 32 + 32 + 32 * CLASSES + CLASSES;
    let config = ZeroConfig {
        stage: ZeroStage::Two,
        optimizer: FlatOptimizer::ADAM,
    };
    // 2 ranks train 5 steps and save; 3 ranks (and 1) resume from the bytes: the next step's
    // parameters agree with 2 ranks going on uninterrupted.
    let run = |world: usize, state: Option<Vec<u8>>, start: &Mlp, steps: usize| {
        run_in_process(
            WorldSize::new(world).unwrap(),
            CollectiveConfig::default(),
            |c| {
                let rank = c.rank().index();
                let (mut model, mut zero) = ZeroOptimizer::new(start.clone(), c, config)?;
                let memory = zero.memory();
                assert_eq!(memory.parameter_elements, total);
                assert_eq!(memory.optimizer_state_bytes, 2 * 4 * memory.shard_elements);
                assert_eq!(memory.gradient_bytes, 4 * memory.shard_elements);
                assert_eq!(memory.unsharded_optimizer_state_bytes, 2 * 4 * total);
                if let Some(bytes) = &state {
                    zero.load_state_bytes(bytes)?;
                }
                for s in 0..steps {
                    let batch: Vec<usize> = (0..8).map(|i| (s * 64 + rank * 8 + i) % 640).collect();
                    let grads = data.grads(&model, &batch, 1.0, &device());
                    model = zero.step(LR, model, grads)?;
                }
                Ok::<_, MultiError>((model, zero.state_bytes()?, memory.shard_elements))
            },
        )
        .unwrap()
    };
    let first = run(2, None, &init, 5);
    let shards: Vec<usize> = first.iter().map(|r| r.2).collect();
    assert_eq!(shards.iter().sum::<usize>(), total);
    assert_eq!(first[0].1, first[1].1, "ranks gathered different states");
    let (saved_model, saved_state) = (first[0].0.clone(), first[0].1.clone());
    // One step on 2 ranks with batches of 8 per rank from the same samples, uninterrupted.
    let reference = run(2, Some(saved_state.clone()), &saved_model, 1);
    // The same global batch of 16 on one rank: same update from the same restored state.
    let one = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (model, mut zero) = ZeroOptimizer::new(saved_model.clone(), c, config)?;
        zero.load_state_bytes(&saved_state)?;
        let batch: Vec<usize> = (0..16).collect();
        let grads = data.grads(&model, &batch, 1.0, &device());
        zero.step(LR, model, grads)
    })
    .unwrap()
    .remove(0);
    let diff = max_abs_diff(
        &flatten_params(&reference[0].0).unwrap(),
        &flatten_params(&one).unwrap(),
    );
    assert!(diff <= 1e-6, "resumed on 1 rank: max |delta| {diff}");
    // A state of another optimizer or of another model is refused.
    let sgd_config = ZeroConfig {
        stage: ZeroStage::One,
        optimizer: SGD_MOMENTUM,
    };
    let err = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (_, mut zero) = ZeroOptimizer::new(init.clone(), c, sgd_config)?;
        zero.load_state_bytes(&saved_state)
    })
    .unwrap_err();
    assert!(err.to_string().contains("adam state"), "{err}");
    let err = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (_, mut zero) = ZeroOptimizer::new(init.clone(), c, config)?;
        zero.load_state_bytes(&saved_state[..saved_state.len() - 3])
    })
    .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // The same state per parameter (what checkpoints hold as Burn's record), loaded on 3
    // ranks, gathers back to the same bytes.
    let states = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (_, mut zero) = ZeroOptimizer::new(saved_model.clone(), c, config)?;
        zero.load_state_bytes(&saved_state)?;
        zero.gather_state()
    })
    .unwrap()
    .remove(0);
    assert_eq!(states.len(), 4, "every parameter had a gradient");
    assert!(
        states
            .iter()
            .all(|s| s.steps == 5 && s.second.len() == s.first.len())
    );
    let regathered = run_in_process(
        WorldSize::new(3).unwrap(),
        CollectiveConfig::default(),
        |c| {
            let (_, mut zero) = ZeroOptimizer::new(saved_model.clone(), c, config)?;
            zero.load_state(&states)?;
            zero.state_bytes()
        },
    )
    .unwrap();
    assert!(regathered.iter().all(|bytes| *bytes == saved_state));
    let mut short = states.clone();
    short[1].first.pop();
    let err = run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
        let (_, mut zero) = ZeroOptimizer::new(init.clone(), c, config)?;
        zero.load_state(&short)
    })
    .unwrap_err();
    assert!(err.to_string().contains("state values"), "{err}");
}

/// A replica and its DDP, as one rank holds them.
type Replica = (Mlp, DistributedDataParallel);

/// Two ranks, each with two DDP replicas of a fresh model over small buckets (four for the
/// two layers, so that several are reduced in order), the second set up by `configure`:
/// `step(step, rank, ..)` trains both 3 steps, and their parameters must end bit-identical
/// (and moved).
fn same_bits_two_ways(
    configure: impl Fn(&mut DistributedDataParallel, &Arc<dyn Collective>) + Sync,
    step: impl Fn(usize, usize, &mut Replica, &mut Replica) -> Result<(), MultiError> + Sync,
) {
    let init = Mlp::new(&device());
    let buckets = BucketConfig {
        cap_bytes: 256,
        first_bucket_bytes: 16,
    };
    let config = CollectiveConfig {
        timeout: Duration::from_secs(60),
    };
    let results = run_in_process(WorldSize::new(2).unwrap(), config, |c| {
        let mut reference = DistributedDataParallel::new(init.clone(), Arc::clone(&c), buckets)?;
        let mut other = DistributedDataParallel::new(init.clone(), Arc::clone(&c), buckets)?;
        configure(&mut other.1, &c);
        assert!(other.1.buckets().len() >= 3, "{:?}", other.1.buckets());
        for s in 0..3 {
            step(s, c.rank().index(), &mut reference, &mut other)?;
        }
        Ok::<_, MultiError>((reference, other))
    })
    .unwrap();
    let start = flatten_params(&init).unwrap();
    for (reference, other) in &results {
        let (a, b) = (
            flatten_params(&reference.0).unwrap(),
            flatten_params(&other.0).unwrap(),
        );
        assert!(max_abs_diff(&a, &start) > 0.0, "the steps moved nothing");
        assert_eq!(a, b, "the second way changed the result");
    }
}

/// One synchronised SGD step of `replica` on `grads`.
fn sync_and_step(replica: &mut Replica, grads: GradientsParams) -> Result<(), MultiError> {
    let grads = replica.1.sync(&replica.0, grads)?;
    assert_eq!(grads.len(), 4, "every parameter's averaged gradient");
    replica.0 = sgd().step(LR, replica.0.clone(), grads);
    Ok(())
}

/// Rank `rank`'s 8 samples of step `step`.
fn batch_of(step: usize, rank: usize) -> Vec<usize> {
    (0..8).map(|i| (step * 16 + rank * 8 + i) % 64).collect()
}

/// The all-reduce overlapped with backward (gradient hooks, a communication thread) gives
/// the bits of the all-reduce after backward, over several buckets and steps; gradients taken
/// from the unhooked model while a hooked step is under way are refused.
#[test]
fn overlapped_sync_gives_the_bits_of_sync_after_backward() {
    let data = Data::new(64);
    same_bits_two_ways(
        |ddp, _| ddp.set_overlap(true),
        |step, rank, plain, overlapped| {
            let batch = batch_of(step, rank);
            sync_and_step(plain, data.grads(&plain.0, &batch, 1.0, &device()))?;
            let hooked = overlapped
                .1
                .hook(&overlapped.0)
                .expect("Flex has the hook op");
            let grads = data.grads(&hooked, &batch, 1.0, &device());
            assert!(grads.is_empty(), "the hooked gradients went to the buckets");
            sync_and_step(overlapped, grads)?;
            if step == 2 {
                let (model, ddp) = overlapped;
                drop(ddp.hook(model).expect("hooks again"));
                let grads = data.grads(model, &[0, 1], 1.0, &device());
                let err = ddp.sync(model, grads).map(|_| ()).unwrap_err();
                assert!(err.to_string().contains("hooked model"), "{err}");
            }
            Ok(())
        },
    );
}

/// Buckets built on the device (`HostStaged`, opt-in off the CPU; forced here on Flex) give
/// the bits of the per-parameter host path, a gradient missing on one rank included (the
/// other rank's, averaged with zeros, as on one device).
#[test]
fn buckets_built_on_the_device_give_the_bits_of_the_host_path() {
    let data = Data::new(64);
    same_bits_two_ways(
        |ddp, c| {
            assert!(
                ddp.sync_path().contains("per parameter"),
                "{}",
                ddp.sync_path()
            );
            ddp.set_device_reduce(Some(Arc::new(HostStaged(Arc::clone(c)))));
        },
        |step, rank, host, on_device| {
            for replica in [host, on_device] {
                let mut grads = data.grads(&replica.0, &batch_of(step, rank), 1.0, &device());
                if step == 2 && rank == 1 {
                    let id = replica.0.hidden.weight.id;
                    grads.remove::<2>(id).expect("hidden.weight had a gradient");
                }
                sync_and_step(replica, grads)?;
            }
            Ok(())
        },
    );
}

/// A collective that counts the all-reduces it is asked for, then passes every call on.
struct Counting {
    inner: Arc<dyn Collective>,
    all_reduces: Arc<std::sync::atomic::AtomicUsize>,
}

impl Collective for Counting {
    fn rank(&self) -> Rank {
        self.inner.rank()
    }
    fn world_size(&self) -> WorldSize {
        self.inner.world_size()
    }
    fn all_reduce(&self, buf: &mut [f32], op: kiln_multi::ReduceOp) -> Result<(), MultiError> {
        self.all_reduces
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.all_reduce(buf, op)
    }
    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<(), MultiError> {
        self.inner.broadcast(buf, root)
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), MultiError> {
        self.inner.all_gather(shard, out)
    }
    fn reduce_scatter(
        &self,
        buf: &[f32],
        shard: &mut [f32],
        op: kiln_multi::ReduceOp,
    ) -> Result<(), MultiError> {
        self.inner.reduce_scatter(buf, shard, op)
    }
    fn barrier(&self) -> Result<(), MultiError> {
        self.inner.barrier()
    }
}

/// The overlap overlaps: the output layer's bucket is all-reduced while backward has still to
/// reach the hidden layer. A marker on the activation between the two layers waits (up to
/// 10 s) for the first all-reduce to begin; with the hooks after the whole backward pass (as
/// Burn's depth-first tape runs a hook on the bare parameter) it never begins in time.
#[test]
fn overlapped_buckets_are_all_reduced_while_backward_still_runs() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let data = Data::new(64);
    let init = Mlp::new(&device());
    let buckets = BucketConfig {
        cap_bytes: 256,
        first_bucket_bytes: 16,
    };
    let in_time = run_in_process(
        WorldSize::new(2).unwrap(),
        CollectiveConfig::default(),
        |c| {
            let all_reduces = Arc::new(AtomicUsize::new(0));
            let counting: Arc<dyn Collective> = Arc::new(Counting {
                inner: c,
                all_reduces: Arc::clone(&all_reduces),
            });
            let (model, mut ddp) = DistributedDataParallel::new(init.clone(), counting, buckets)?;
            ddp.set_overlap(true);
            let before = all_reduces.load(Ordering::SeqCst);
            let hooked = ddp.hook(&model).expect("Flex has the hook op");
            let seen = Arc::new(Mutex::new(None));
            let marker = {
                let (seen, all_reduces) = (Arc::clone(&seen), Arc::clone(&all_reduces));
                kiln_kernels::GradReduce(Arc::new(move |_: &mut [f32]| {
                    let start = std::time::Instant::now();
                    while all_reduces.load(Ordering::SeqCst) == before
                        && start.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    *seen.lock().unwrap() = Some(all_reduces.load(Ordering::SeqCst) > before);
                }))
            };
            let (x, y) = data.batch(&batch_of(0, 0), &device());
            let h = hooked.relu.forward(hooked.hidden.forward(x));
            let h = kiln_kernels::reduce_grad(h, marker).expect("f32 on Flex");
            let loss = CrossEntropyLossConfig::new()
                .init(&device())
                .forward(hooked.out.forward(h), y);
            let grads = GradientsParams::from_grads(loss.backward(), &hooked);
            ddp.sync(&model, grads)?;
            let seen = seen.lock().unwrap().expect("backward reached the marker");
            Ok::<_, MultiError>(seen)
        },
    )
    .unwrap();
    assert_eq!(
        in_time,
        [true, true],
        "no bucket was all-reduced during backward"
    );
}
