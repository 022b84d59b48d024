//! Data-parallel training of your own Burn model with kiln-multi, in your own training loop.
//!
//! The model below is a plain `#[derive(Module)]` MLP that knows nothing about ranks. Each of
//! the two ranks (threads) holds a replica; `DistributedDataParallel::new` copies rank 0's
//! parameters to the others, and `sync` averages every step's gradients, so the replicas take
//! identical optimizer steps. Like PyTorch DDP, the sampler gives each rank its own part of the
//! data, reshuffled every epoch.
//!
//! Run: `cargo run --release --example data_parallel`

use std::sync::Arc;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor};
use kiln::multi::{
    BucketConfig, Collective, CollectiveConfig, DistributedDataParallel, DistributedSampler,
    DistributedSamplerConfig, WorldSize, run_in_process,
};
use kiln::recipes::mnist_data::MnistSource;
use kiln::trainer::data::{ImageDataset, MnistSplit, make_batch};

/// Your model, unchanged.
#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    relu: Relu,
    out: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            hidden: LinearConfig::new(28 * 28, 128).init(device),
            relu: Relu::new(),
            out: LinearConfig::new(128, 10).init(device),
        }
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let [batch, ..] = images.dims();
        let x = images.reshape([batch, 28 * 28]);
        self.out.forward(self.relu.forward(self.hidden.forward(x)))
    }
}

fn main() -> anyhow::Result<()> {
    let world = WorldSize::new(2)?;
    let (epochs, batch_per_rank) = (2u64, 32);
    let train = MnistSource::Embedded.load(MnistSplit::Train)?;
    let test = MnistSource::Embedded.load(MnistSplit::Test)?;
    let sampler = DistributedSampler::new(
        train.len(),
        world,
        DistributedSamplerConfig {
            shuffle: true,
            seed: 0,
            drop_last: false,
        },
    )?;

    let accuracies = run_in_process(
        world,
        CollectiveConfig::default(),
        |comm: Arc<dyn Collective>| {
            let device = Device::flex().autodiff();
            let rank = comm.rank();
            // Every rank builds a model; rank 0's parameters win.
            let (mut model, mut ddp) =
                DistributedDataParallel::new(Mlp::new(&device), comm, BucketConfig::default())?;
            let mut optimizer = SgdConfig::new()
                .with_momentum(Some(MomentumConfig {
                    momentum: 0.9,
                    dampening: 0.0,
                    nesterov: false,
                }))
                .init();
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            for epoch in 0..epochs {
                for batch in sampler.indices(rank, epoch).chunks(batch_per_rank) {
                    let batch = make_batch(&train, batch, &device);
                    let loss = loss_fn.forward(model.forward(batch.images), batch.targets);
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    let grads = ddp.sync(&model, grads)?; // the one data-parallel line
                    model = optimizer.step(0.01, model, grads);
                }
            }
            // Every replica is the same model now; each rank measures it on the test set.
            let plain = device.without_autodiff();
            let model = model.valid();
            let all: Vec<usize> = (0..test.len()).collect();
            let batch = make_batch(&test, &all, &plain);
            let predicted = model.forward(batch.images).argmax(1).reshape([test.len()]);
            let correct = predicted
                .equal(batch.targets)
                .int()
                .sum()
                .into_scalar::<i64>();
            anyhow::Ok(correct as f64 / test.len() as f64)
        },
    )?;

    println!(
        "2 ranks x batch {batch_per_rank}, {epochs} epochs: test accuracy {:.2}% on every rank ({:?})",
        100.0 * accuracies[0],
        accuracies
    );
    anyhow::ensure!(
        accuracies.iter().all(|&a| a == accuracies[0]),
        "replicas disagree: {accuracies:?}"
    );
    anyhow::ensure!(
        accuracies[0] > 0.85,
        "the MLP did not learn: {accuracies:?}"
    );
    Ok(())
}
