//! The one epoch loop of the workspace.

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use kiln_multi::{DistributedDataParallel, ZeroOptimizer};

use crate::config::LrGroup;
use crate::data::{ImageBatch, ImageDataset, make_training_batch};
use crate::error::Result;
use crate::report::Progress;

/// What one training epoch measured.
pub(crate) struct EpochOutcome {
    /// Mean loss of this rank's batches.
    pub(crate) mean_loss: f64,
    pub(crate) steps: u64,
    /// Samples this rank trained on.
    pub(crate) samples: usize,
    pub(crate) seconds: f64,
}

/// Everything one epoch needs besides the model and optimizer it updates.
pub(crate) struct EpochInputs<'a> {
    pub(crate) data: &'a dyn ImageDataset,
    pub(crate) order: &'a [usize],
    /// Samples per batch on this rank.
    pub(crate) batch_size: usize,
    pub(crate) lr: f64,
    /// Learning rates of parameter groups (replicated optimizers only).
    pub(crate) lr_groups: &'a [LrGroup],
    pub(crate) device: &'a Device,
    /// The epoch (from 0), which seeds the data set's augmentation.
    pub(crate) epoch: usize,
}

/// How a step's loss and gradients are computed: on one device, or through a pipeline.
pub(crate) type LossAndGrads<'a, M> =
    dyn FnMut(&M, ImageBatch) -> Result<(f64, GradientsParams)> + 'a;

/// How a rank turns its gradients into the next parameters.
pub(crate) enum Updater<'a> {
    /// Every rank holds the whole optimizer state; with `ddp`, gradients are first averaged
    /// with the other ranks'.
    Replicated {
        optimizer: &'a mut ModuleOptimizer,
        ddp: Option<&'a mut DistributedDataParallel>,
    },
    /// The optimizer state is split over the ranks (ZeRO).
    Sharded(&'a mut ZeroOptimizer),
}

impl Updater<'_> {
    fn world(&self) -> usize {
        match self {
            Updater::Replicated { ddp: None, .. } => 1,
            Updater::Replicated { ddp: Some(ddp), .. } => ddp.collective().world_size().get(),
            Updater::Sharded(zero) => zero.collective().world_size().get(),
        }
    }

    fn step<M: Module>(
        &mut self,
        lr: f64,
        groups: &[LrGroup],
        model: M,
        grads: GradientsParams,
    ) -> Result<M> {
        Ok(match self {
            Updater::Replicated { optimizer, ddp } => {
                let grads = match ddp {
                    Some(ddp) => ddp.sync(&model, grads)?,
                    None => grads,
                };
                let mut model = model;
                for (lr, grads) in split_by_group(&model, grads, lr, groups) {
                    if !grads.is_empty() {
                        model = optimizer.step(lr, model, grads);
                    }
                }
                model
            }
            Updater::Sharded(zero) => zero.step(lr, model, grads)?,
        })
    }
}

/// Splits `grads` by learning-rate group: `(lr, the rest)` first, then one entry per group.
/// One optimizer step per entry updates every parameter once, each with its own rate (the
/// optimizer keeps its state per parameter).
fn split_by_group<M: Module>(
    model: &M,
    grads: GradientsParams,
    lr: f64,
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
        .chain(groups.iter().map(|g| g.lr).zip(splitter.out))
        .collect()
}

/// Runs one pass over `inputs.order` in batches, one optimizer step per batch, with the loss
/// and gradients from `loss_and_grads`, through `updater`; the progress bar shows this rank's
/// loss and the throughput of all ranks together.
pub(crate) fn train_epoch<M: Module>(
    mut model: M,
    loss_and_grads: &mut LossAndGrads<'_, M>,
    mut updater: Updater<'_>,
    inputs: EpochInputs<'_>,
    progress: &Progress,
) -> Result<(M, EpochOutcome)> {
    let world = updater.world();
    let start = Instant::now();
    let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0u64, 0usize);
    for chunk in inputs.order.chunks(inputs.batch_size) {
        let batch = make_training_batch(inputs.data, chunk, inputs.epoch, inputs.device);
        let (loss_value, grads) = loss_and_grads(&model, batch)?;
        model = updater.step(inputs.lr, inputs.lr_groups, model, grads)?;
        loss_sum += loss_value;
        steps += 1;
        samples += chunk.len();
        progress.batch_done(
            loss_value,
            (samples * world) as f64 / start.elapsed().as_secs_f64().max(1e-9),
        );
    }
    let outcome = EpochOutcome {
        mean_loss: loss_sum / steps.max(1) as f64,
        steps,
        samples,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((model, outcome))
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};

    use super::*;
    use crate::config::TrainerConfig;

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
        let ga: Vec<f32> = grads
            .get::<2>(model.a.weight.id)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let gb: Vec<f32> = grads
            .get::<2>(model.b.weight.id)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let (a0, b0) = (values(&model.a), values(&model.b));
        let mut optimizer = TrainerConfig::default().optimizer();
        let mut updater = Updater::Replicated {
            optimizer: &mut optimizer,
            ddp: None,
        };
        let groups = [LrGroup {
            prefix: "b.".into(),
            lr: 0.5,
        }];
        let stepped = updater.step(0.1, &groups, model, grads).unwrap();
        // First SGD-momentum step: p -= lr * g.
        for ((new, old), g) in values(&stepped.a).iter().zip(&a0).zip(&ga) {
            assert!((new - (old - 0.1 * g)).abs() < 1e-6);
        }
        for ((new, old), g) in values(&stepped.b).iter().zip(&b0).zip(&gb) {
            assert!((new - (old - 0.5 * g)).abs() < 1e-6);
        }
    }
}
