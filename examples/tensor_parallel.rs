//! Tensor parallelism inside a Burn model: SimpleCNN with its classifier split over 2 ranks,
//! Megatron-style. fc1 (3136 -> 128) keeps 64 output features per rank
//! (`ColumnParallelLinear`), fc2 (128 -> 10) the matching 64 input features
//! (`RowParallelLinear`, whose forward all-reduces the partial logits), so each rank holds half
//! of the classifier's 402,000 weights. Both ranks see the same batches; the gradients of the
//! replicated conv layers in front of the split block are summed with `sum_gradients`. The
//! model is `kiln::recipes::cnn_mnist::TensorParallelCnn` (what `kiln train cnn-mnist
//! --tensor-parallel 2` trains through the trainer); this example runs the steps by hand.
//!
//! The run trains 30 SGD-momentum steps on the embedded MNIST subset, then gathers the split
//! layers and checks the logits of 256 test images against SimpleCNN trained on one device
//! from the same initialisation on the same batches.
//!
//! Run: `cargo run --release --example tensor_parallel` (2 threads), or over MPI, one rank per
//! process: `cargo build --release --features mpi --example tensor_parallel`, then
//! `kiln launch --nproc-per-node 2 -- target/release/examples/tensor_parallel`.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use kiln::models::SimpleCnnConfig;
use kiln::multi::{Collective, CollectiveConfig, MultiError, Rank, WorldSize, run_in_process};
use kiln::recipes::cnn_mnist::TensorParallelCnn;
use kiln::recipes::distributed::run_as_launched;
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::TrainerConfig;
use kiln::trainer::data::{MnistDataset, MnistSplit, make_batch};

const STEPS: usize = 30;
const BATCH: usize = 64;
const LR: f64 = 0.01;

/// SGD with momentum 0.9, as the trainer runs it.
fn sgd() -> ModuleOptimizer {
    TrainerConfig::default().build_optimizer()
}

fn batch_indices(step: usize) -> Vec<usize> {
    (step * BATCH..(step + 1) * BATCH).collect()
}

fn main() -> anyhow::Result<()> {
    let device = Device::flex().autodiff();
    let train = MnistSource::Embedded.load(MnistSplit::Train)?;
    let test = MnistSource::Embedded.load(MnistSplit::Test)?.take(256);
    let init = SimpleCnnConfig::new().init(&device, 7);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    // One device.
    let mut single = init.clone();
    let mut optimizer = sgd();
    for step in 0..STEPS {
        let batch = make_batch(&train, &batch_indices(step), &device);
        let loss = loss_fn.forward(single.forward(batch.images), batch.targets);
        let grads = GradientsParams::from_grads(loss.backward(), &single);
        single = optimizer.step(LR, single, grads);
    }
    let expected = logits(&test, |x| Ok(single.forward(x)))?;

    // The classifier split between ranks: 2 threads here, or, under `kiln launch` (built with
    // `--features mpi`), one rank per process over MPI.
    let train_rank = |c: Arc<dyn Collective>| {
        let mut model = TensorParallelCnn::split(&init.clone().fork(&device), Arc::clone(&c))?;
        let mut optimizer = sgd();
        for step in 0..STEPS {
            let batch = make_batch(&train, &batch_indices(step), &device);
            let loss = loss_fn.forward(model.try_forward(batch.images)?, batch.targets);
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            // The conv layers feed the split block: each rank holds part of their gradient
            // (`sum_gradients` over the conv blocks).
            model.sync_gradients(&mut grads, &*c)?;
            model = optimizer.step(LR, model, grads);
        }
        let weights = model.fc1.linear.weight.val().dims();
        logits(&test, |x| model.try_forward(x)).map(|l| (l, weights, c.rank(), c.world_size()))
    };
    let timeout = CollectiveConfig::DEFAULT_TIMEOUT;
    let results = run_as_launched(timeout, |group| -> anyhow::Result<_> {
        Ok(match group {
            Some(c) => vec![train_rank(c)?],
            None => run_in_process(WorldSize::new(2)?, CollectiveConfig::default(), train_rank)?,
        })
    })?;
    let (parallel, fc1_shape, rank, world) = &results[0];
    if *rank != Rank::ZERO {
        return Ok(());
    }
    let diff = parallel
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        ); // NaN fails
    println!(
        "tensor parallel on {} ranks (fc1 weight per rank {fc1_shape:?} of [3136, 128]), \
         {STEPS} steps: max |logit difference| vs one device = {diff:e}",
        world.get()
    );
    anyhow::ensure!(diff <= 1e-4, "tensor-parallel logits differ by {diff}");
    Ok(())
}

/// Logits of the whole test set through `forward`, flattened.
fn logits(
    test: &MnistDataset,
    forward: impl Fn(Tensor<4>) -> Result<Tensor<2>, MultiError>,
) -> Result<Vec<f32>, MultiError> {
    let device = Device::flex().autodiff();
    let indices: Vec<usize> = (0..256).collect();
    let batch = make_batch(test, &indices, &device);
    let out = forward(batch.images)?;
    out.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| MultiError::Tensor {
            context: "reading logits".to_string(),
            detail: format!("{e:?}"),
        })
}
