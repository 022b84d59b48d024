//! Pipeline training against the same model trained on one device: every schedule, 2 and 3
//! stages, 1 to 8 micro-batches, must give the parameters of plain training on the batch.

use std::num::NonZeroUsize;
use std::time::Duration;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_multi::MultiError;
use kiln_multi::data_parallel::flatten_params;
use kiln_multi::pipeline::{
    Activation, ModuleStage, Pipeline, PipelineConfig, PipelineSchedule, PipelineStage, merge_grads,
};
use rand::rngs::StdRng;

use crate::common::{device, max_abs_diff, sgd};
use rand::{Rng, SeedableRng};

const BATCH: usize = 16;
const CLASSES: usize = 5;
const LR: f64 = 0.05;

#[derive(Module, Debug)]
struct ConvPart {
    conv: Conv2d,
    relu: Relu,
    pool: MaxPool2d,
}

impl ConvPart {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.pool.forward(self.relu.forward(self.conv.forward(x)))
    }
}

#[derive(Module, Debug)]
struct Hidden {
    fc: Linear,
    relu: Relu,
}

impl Hidden {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let [b, ..] = x.dims();
        self.relu
            .forward(self.fc.forward(x.reshape([b, 4 * 4 * 4])))
    }
}

#[derive(Module, Debug)]
struct Head {
    fc: Linear,
}

impl Head {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc.forward(x)
    }
}

#[derive(Module, Debug)]
struct Tail {
    hidden: Hidden,
    head: Head,
}

impl Tail {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.hidden.forward(x))
    }
}

/// The whole model, as a user would train it on one device.
#[derive(Module, Debug)]
struct Whole {
    conv: ConvPart,
    hidden: Hidden,
    head: Head,
}

impl Whole {
    fn new(device: &Device) -> Self {
        Self {
            conv: ConvPart {
                conv: Conv2dConfig::new([1, 4], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
                relu: Relu::new(),
                pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            },
            hidden: Hidden {
                fc: LinearConfig::new(64, 16).init(device),
                relu: Relu::new(),
            },
            head: Head {
                fc: LinearConfig::new(16, CLASSES).init(device),
            },
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.hidden.forward(self.conv.forward(x)))
    }
}

/// Batches of random 8x8 images with labels.
fn batches(steps: usize) -> Vec<(Tensor<4>, Tensor<1, Int>)> {
    let mut rng = StdRng::seed_from_u64(11);
    (0..steps)
        .map(|_| {
            let x: Vec<f32> = (0..BATCH * 64)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let y: Vec<i64> = (0..BATCH)
                .map(|_| rng.random_range(0..CLASSES as i64))
                .collect();
            (
                Tensor::<4>::from_data(TensorData::new(x, [BATCH, 1, 8, 8]), &device()),
                Tensor::<1, Int>::from_data(TensorData::new(y, [BATCH]), &device()),
            )
        })
        .collect()
}

fn train_single(init: &Whole, data: &[(Tensor<4>, Tensor<1, Int>)]) -> Vec<f32> {
    train_one_device(init, Whole::forward, data)
}

/// The parameters of `init` after one plain SGD step per batch of `data` on one device.
fn train_one_device<M: Module, const D: usize>(
    init: &M,
    forward: fn(&M, Tensor<D>) -> Tensor<2>,
    data: &[(Tensor<D>, Tensor<1, Int>)],
) -> Vec<f32> {
    let mut model = init.clone().fork(&device());
    let mut optimizer = sgd();
    let loss_fn = CrossEntropyLossConfig::new().init(&device());
    for (x, y) in data {
        let loss = loss_fn.forward(forward(&model, x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(LR, model, grads);
    }
    flatten_params(&model).unwrap()
}

/// `model` split into `count` stages (2: convolutions | classifier; 3: convolutions | hidden
/// layer | head), sharing its parameters.
fn stages(model: &Whole, count: usize) -> Vec<Box<dyn PipelineStage>> {
    let first: Box<dyn PipelineStage> = Box::new(ModuleStage::new(
        "conv",
        model.conv.clone(),
        ConvPart::forward,
        device(),
    ));
    if count == 2 {
        let tail = Tail {
            hidden: model.hidden.clone(),
            head: model.head.clone(),
        };
        vec![
            first,
            Box::new(ModuleStage::new("tail", tail, Tail::forward, device())),
        ]
    } else {
        vec![
            first,
            Box::new(ModuleStage::new(
                "hidden",
                model.hidden.clone(),
                Hidden::forward,
                device(),
            )),
            Box::new(ModuleStage::new(
                "head",
                model.head.clone(),
                Head::forward,
                device(),
            )),
        ]
    }
}

fn config(schedule: PipelineSchedule, micro: usize) -> PipelineConfig {
    PipelineConfig {
        schedule,
        micro_batches: NonZeroUsize::new(micro).unwrap(),
        timeout: Duration::from_secs(30),
        threads_per_stage: None,
        defer_weight_gradients: true,
    }
}

#[test]
fn every_schedule_matches_one_device_for_10_steps() {
    let init = Whole::new(&device());
    let data = batches(10);
    let single = train_single(&init, &data);
    let moved = max_abs_diff(&flatten_params(&init).unwrap(), &single);
    assert!(
        moved > 1e-2,
        "training barely moved the parameters ({moved})"
    );
    let mut cases = vec![(PipelineSchedule::Naive, 2, 1)];
    for p in [2, 3] {
        for m in [1, 4, 8] {
            cases.push((PipelineSchedule::GPipe, p, m));
            cases.push((PipelineSchedule::OneFOneB, p, m));
        }
    }
    for (schedule, p, m) in cases {
        let pipeline = Pipeline::new(NonZeroUsize::new(p).unwrap(), config(schedule, m)).unwrap();
        let mut model = init.clone().fork(&device());
        let mut optimizer = sgd();
        for (x, y) in &data {
            let mut parts = stages(&model, p);
            let report = pipeline
                .run(&mut parts, Activation::Rank4(x.clone()), y.clone())
                .unwrap();
            let expected_micro = schedule.micro_batches(NonZeroUsize::new(m).unwrap()).get();
            assert_eq!(report.micro_batches, expected_micro);
            let peaks = &report.peak_in_flight;
            match schedule {
                PipelineSchedule::GPipe => assert!(peaks.iter().all(|&k| k == m), "{peaks:?}"),
                PipelineSchedule::OneFOneB => assert!(
                    peaks.iter().enumerate().all(|(s, &k)| k <= (p - s).min(m)),
                    "{peaks:?}"
                ),
                PipelineSchedule::Naive => assert!(peaks.iter().all(|&k| k == 1)),
            }
            assert!(report.loss.is_finite() && report.loss > 0.0);
            let grads = merge_grads(&model, &mut parts);
            model = optimizer.step(LR, model, grads);
        }
        let diff = max_abs_diff(&flatten_params(&model).unwrap(), &single);
        eprintln!("{schedule:?} p={p} m={m}: max |delta param| after 10 steps = {diff:e}");
        assert!(diff <= 1e-5, "{schedule:?} p={p} m={m}: {diff}");
    }
}

#[test]
fn a_layer_on_the_wrong_device_is_named_before_the_first_step() {
    let init = Whole::new(&device());
    // The seed's bug: the classifier built on another device than its stage.
    let misplaced = Whole::new(&Device::flex());
    let mut stages: Vec<Box<dyn PipelineStage>> = vec![
        Box::new(ModuleStage::new(
            "conv",
            init.conv,
            ConvPart::forward,
            device(),
        )),
        Box::new(ModuleStage::new(
            "classifier",
            Tail {
                hidden: init.hidden,
                head: misplaced.head,
            },
            Tail::forward,
            device(),
        )),
    ];
    let pipeline = Pipeline::new(
        NonZeroUsize::new(2).unwrap(),
        config(PipelineSchedule::GPipe, 2),
    )
    .unwrap();
    let (x, y) = batches(1).remove(0);
    let err = pipeline
        .run(&mut stages, Activation::Rank4(x), y)
        .expect_err("placement must be refused");
    match &err {
        MultiError::Placement {
            stage: 1,
            stage_name,
            layer,
            found,
            expected,
        } => {
            assert_eq!(stage_name, "classifier");
            assert!(layer.contains("head"), "{layer}");
            assert_ne!(found, expected);
        }
        other => panic!("expected a placement error, got {other:?}"),
    }
    eprintln!("{err}");
}

/// `init` as two stages, convolutions | the rest, with `tail_forward` for the second.
fn conv_and_tail<F>(init: Whole, tail_forward: F) -> Vec<Box<dyn PipelineStage>>
where
    F: Fn(&Tail, Tensor<4>) -> Tensor<2> + Send + 'static,
{
    let tail = Tail {
        hidden: init.hidden,
        head: init.head,
    };
    vec![
        Box::new(ModuleStage::new(
            "conv",
            init.conv,
            ConvPart::forward,
            device(),
        )),
        Box::new(ModuleStage::new("tail", tail, tail_forward, device())),
    ]
}

#[test]
fn a_stage_that_panics_fails_the_step_without_hanging() {
    let init = Whole::new(&device());
    let failing = |_: &Tail, _: Tensor<4>| -> Tensor<2> { panic!("bad layer") };
    let mut stages = conv_and_tail(init, failing);
    let pipeline = Pipeline::new(
        NonZeroUsize::new(2).unwrap(),
        config(PipelineSchedule::OneFOneB, 4),
    )
    .unwrap();
    let (x, y) = batches(1).remove(0);
    let err = pipeline
        .run(&mut stages, Activation::Rank4(x), y)
        .unwrap_err();
    assert!(
        matches!(&err, MultiError::RankPanicked { rank: 1, message } if message.contains("bad layer")),
        "{err:?}"
    );
}

#[test]
fn a_stalled_stage_times_out_its_neighbour() {
    let init = Whole::new(&device());
    let slow = |tail: &Tail, x: Tensor<4>| -> Tensor<2> {
        std::thread::sleep(Duration::from_millis(1500));
        tail.forward(x)
    };
    let mut stages = conv_and_tail(init, slow);
    let mut config = config(PipelineSchedule::GPipe, 2);
    config.timeout = Duration::from_millis(200);
    let pipeline = Pipeline::new(NonZeroUsize::new(2).unwrap(), config).unwrap();
    let (x, y) = batches(1).remove(0);
    let err = pipeline
        .run(&mut stages, Activation::Rank4(x), y)
        .unwrap_err();
    assert!(
        matches!(&err, MultiError::Pipeline { stage: 0, reason } if reason.contains("waited") && reason.contains("gradient")),
        "{err:?}"
    );
}

/// Convolutions with batch norm: running statistics must survive pipeline steps.
#[derive(Module, Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    relu: Relu,
    pool: MaxPool2d,
}

impl ConvBn {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.bn.forward(self.conv.forward(x));
        self.pool.forward(self.relu.forward(x))
    }
}

#[derive(Module, Debug)]
struct WholeBn {
    front: ConvBn,
    tail: Tail,
}

#[test]
fn batch_norm_running_statistics_follow_one_device_with_one_micro_batch() {
    let init = Whole::new(&device());
    let model = WholeBn {
        front: ConvBn {
            conv: init.conv.conv.clone(),
            bn: BatchNormConfig::new(4).init(&device()),
            relu: Relu::new(),
            pool: init.conv.pool.clone(),
        },
        tail: Tail {
            hidden: init.hidden.clone(),
            head: init.head.clone(),
        },
    };
    let data = batches(5);
    let loss_fn = CrossEntropyLossConfig::new().init(&device());

    let mut single = model.clone().fork(&device());
    let mut optimizer = sgd();
    for (x, y) in &data {
        let logits = single.tail.forward(single.front.forward(x.clone()));
        let loss = loss_fn.forward(logits, y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &single);
        single = optimizer.step(LR, single, grads);
    }

    let mut piped = model.fork(&device());
    let mut optimizer = sgd();
    let pipeline = Pipeline::new(
        NonZeroUsize::new(2).unwrap(),
        config(PipelineSchedule::GPipe, 1),
    )
    .unwrap();
    for (x, y) in &data {
        let mut stages: Vec<Box<dyn PipelineStage>> = vec![
            Box::new(ModuleStage::new(
                "conv",
                piped.front.clone(),
                ConvBn::forward,
                device(),
            )),
            Box::new(ModuleStage::new(
                "tail",
                piped.tail.clone(),
                Tail::forward,
                device(),
            )),
        ];
        pipeline
            .run(&mut stages, Activation::Rank4(x.clone()), y.clone())
            .unwrap();
        let grads = merge_grads(&piped, &mut stages);
        piped = optimizer.step(LR, piped, grads);
    }
    // Running statistics are read as the model is evaluated.
    let running = |m: &WholeBn| {
        let bn = m.front.bn.clone().valid();
        let mean = bn
            .running_mean
            .value()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let var = bn
            .running_var
            .value()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        [mean, var].concat()
    };
    let (a, b) = (running(&single), running(&piped));
    assert!(
        a.iter().any(|v| (v - 1.0).abs() > 1e-3 && v.abs() > 1e-3),
        "statistics never moved: {a:?}"
    );
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff < 1e-5,
        "running statistics differ by {diff}: {a:?} vs {b:?}"
    );
    let params = max_abs_diff(
        &flatten_params(&single).unwrap(),
        &flatten_params(&piped).unwrap(),
    );
    assert!(params < 1e-5, "parameters differ by {params}");
}

/// A stage of 3x3 convolutions on 2x2 and 1x1 maps with kiln's kernels, like ResNet's
/// `layer3`/`layer4` at a 32x32 input: weights much larger than the activations (the pipeline
/// defers their gradients to the end of the step) and kernels with taps that never meet the
/// input (cut once per step).
#[derive(Module, Debug)]
struct SmallMaps {
    down: Conv2d,
    same: Conv2d,
    to_one: Conv2d,
    one: Conv2d,
    fc: Linear,
    relu: Relu,
}

impl SmallMaps {
    fn new(device: &Device) -> Self {
        let conv = |c_in, stride| {
            Conv2dConfig::new([c_in, 48], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            down: conv(4, 2),
            same: conv(48, 1),
            to_one: conv(48, 2),
            one: conv(48, 1),
            fc: LinearConfig::new(48, CLASSES).init(device),
            relu: Relu::new(),
        }
    }

    /// `[batch, 4, 4, 4]` -> 2x2 -> 2x2 -> 1x1 -> 1x1 -> logits.
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = x;
        for conv in [&self.down, &self.same, &self.to_one, &self.one] {
            x = self.relu.forward(kiln_kernels::conv2d(conv, x));
        }
        let [b, c, ..] = x.dims();
        self.fc.forward(x.reshape([b, c]))
    }
}

/// The first stage in front of [`SmallMaps`]: a convolution on the 8x8 input, then 2x2 pooling.
#[derive(Module, Debug)]
struct Stem {
    conv: Conv2d,
    pool: MaxPool2d,
}

impl Stem {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.pool.forward(kiln_kernels::conv2d(&self.conv, x))
    }
}

#[derive(Module, Debug)]
struct StemAndSmallMaps {
    stem: Stem,
    rest: SmallMaps,
}

impl StemAndSmallMaps {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.rest.forward(self.stem.forward(x))
    }
}

#[test]
fn deferred_weight_gradients_match_one_device_for_10_steps() {
    let device = device();
    let init = StemAndSmallMaps {
        stem: Stem {
            conv: Conv2dConfig::new([1, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
        },
        rest: SmallMaps::new(&device),
    };
    let data = batches(10);
    let single = train_one_device(&init, StemAndSmallMaps::forward, &data);
    for (schedule, m, defer) in [
        (PipelineSchedule::GPipe, 4, true),
        (PipelineSchedule::OneFOneB, 4, true),
        (PipelineSchedule::OneFOneB, 8, true),
        (PipelineSchedule::OneFOneB, 4, false),
        (PipelineSchedule::Naive, 1, true),
    ] {
        let config = PipelineConfig {
            defer_weight_gradients: defer,
            ..config(schedule, m)
        };
        let pipeline = Pipeline::new(NonZeroUsize::new(2).unwrap(), config).unwrap();
        let mut model = init.clone().fork(&device);
        let mut optimizer = sgd();
        for (x, y) in &data {
            let mut parts: Vec<Box<dyn PipelineStage>> = vec![
                Box::new(ModuleStage::new(
                    "stem",
                    model.stem.clone(),
                    Stem::forward,
                    device.clone(),
                )),
                Box::new(ModuleStage::new(
                    "small maps",
                    model.rest.clone(),
                    SmallMaps::forward,
                    device.clone(),
                )),
            ];
            let report = pipeline
                .run(&mut parts, Activation::Rank4(x.clone()), y.clone())
                .unwrap();
            // Deferred: the three 48 -> 48 convolutions (weights of 20,736 values; at most
            // 4 x 4 x 48 x 4 input and output values per micro-batch). Not deferred: the stem
            // and `down` (4 input channels), whose weights are smaller than the activations
            // they would keep; nothing with one micro-batch or with deferral off.
            let expected = if defer && m > 1 {
                vec![0, 3]
            } else {
                vec![0, 0]
            };
            assert_eq!(report.deferred_gradients, expected, "{schedule:?} m={m}");
            let grads = merge_grads(&model, &mut parts);
            model = optimizer.step(LR, model, grads);
        }
        let diff = max_abs_diff(&flatten_params(&model).unwrap(), &single);
        eprintln!("{schedule:?} m={m} defer={defer}: max |delta param| after 10 steps = {diff:e}");
        assert!(diff <= 1e-5, "{schedule:?} m={m} defer={defer}: {diff}");
    }
}

/// A layer applied in both stages (tied weights): its gradient is the sum of both stages'.
#[derive(Module, Debug)]
struct Tied {
    shared: Linear,
    head: Linear,
    relu: Relu,
}

#[derive(Module, Debug)]
struct TiedFirst {
    shared: Linear,
    relu: Relu,
}

impl TiedFirst {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.relu.forward(self.shared.forward(x))
    }
}

impl Tied {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let first = TiedFirst {
            shared: self.shared.clone(),
            relu: self.relu.clone(),
        };
        self.head.forward(first.forward(first.forward(x)))
    }
}

#[test]
fn a_layer_shared_by_two_stages_gets_both_gradients() {
    let device = device();
    let init = Tied {
        shared: LinearConfig::new(12, 12).init(&device),
        head: LinearConfig::new(12, CLASSES).init(&device),
        relu: Relu::new(),
    };
    let mut rng = StdRng::seed_from_u64(5);
    let data: Vec<(Tensor<2>, Tensor<1, Int>)> = (0..10)
        .map(|_| {
            let x: Vec<f32> = (0..BATCH * 12)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let y: Vec<i64> = (0..BATCH)
                .map(|_| rng.random_range(0..CLASSES as i64))
                .collect();
            (
                Tensor::<2>::from_data(TensorData::new(x, [BATCH, 12]), &device),
                Tensor::<1, Int>::from_data(TensorData::new(y, [BATCH]), &device),
            )
        })
        .collect();
    let single = train_one_device(&init, Tied::forward, &data);
    let pipeline = Pipeline::new(
        NonZeroUsize::new(2).unwrap(),
        config(PipelineSchedule::OneFOneB, 4),
    )
    .unwrap();
    let mut model = init.fork(&device);
    let mut optimizer = sgd();
    for (x, y) in &data {
        let first = TiedFirst {
            shared: model.shared.clone(),
            relu: model.relu.clone(),
        };
        let mut parts: Vec<Box<dyn PipelineStage>> = vec![
            Box::new(ModuleStage::new(
                "first",
                first.clone(),
                TiedFirst::forward,
                device.clone(),
            )),
            Box::new(ModuleStage::new(
                "second",
                Tied {
                    shared: model.shared.clone(),
                    head: model.head.clone(),
                    relu: model.relu.clone(),
                },
                |m: &Tied, x: Tensor<2>| m.head.forward(m.relu.forward(m.shared.forward(x))),
                device.clone(),
            )),
        ];
        pipeline
            .run(&mut parts, Activation::Rank2(x.clone()), y.clone())
            .unwrap();
        let grads = merge_grads(&model, &mut parts);
        model = optimizer.step(LR, model, grads);
    }
    let diff = max_abs_diff(&flatten_params(&model).unwrap(), &single);
    assert!(diff <= 1e-5, "tied weights: {diff}");
}
