use std::sync::Arc;

use burn::module::Module;
use burn::optim::GradientsParams;

use super::bucket::{BucketConfig, BucketLayout, GradientBucket};
use super::params::{
    ensure_all_placed, flatten_grads, flatten_params, load_params, trainable_params,
    unflatten_grads,
};
use crate::collective::{Collective, ReduceOp};
use crate::error::Result;
use crate::mesh::Rank;

/// Keeps one rank's replica of a model in step with the other ranks' replicas: PyTorch's
/// `DistributedDataParallel`, for any Burn [`Module`].
///
/// [`new`](Self::new) copies rank 0's parameters into every replica; [`sync`](Self::sync)
/// averages each step's gradients over the ranks in buckets, so that identical optimizers on
/// every rank take identical steps and the replicas (and optimizer states) stay identical.
/// [`accumulate`](Self::accumulate) adds a micro-batch's gradients locally without
/// communicating (PyTorch's `no_sync`).
///
/// The model itself is not wrapped: forward and backward run on the replica unchanged, and the
/// gradients go through [`sync`](Self::sync) on their way to the optimizer.
///
/// # Overlap
/// Burn 0.22's `backward()` returns all gradients at once, with no per-parameter hook, so the
/// all-reduce cannot start while backward is still running, as PyTorch's does. Buckets are still
/// laid out in reverse registration order (the order backward produces gradients) so that the
/// layout is PyTorch's and ready for such a hook.
pub struct DistributedDataParallel {
    collective: Arc<dyn Collective>,
    layout: BucketLayout,
    buffers: Vec<Vec<f32>>,
    /// Micro-batches added to `buffers` since the last sync.
    pending: usize,
}

impl DistributedDataParallel {
    /// Makes `model` this rank's replica: overwrites its parameters with rank 0's (every rank
    /// must call this with a model of the same structure) and plans the gradient buckets.
    ///
    /// # Errors
    /// When the broadcast fails (timeout, failed peer, models of different sizes) or the
    /// bucket caps are zero.
    pub fn new<M: Module>(
        model: M,
        collective: Arc<dyn Collective>,
        buckets: BucketConfig,
    ) -> Result<(M, Self)> {
        buckets.validate()?;
        let model = broadcast_module(model, collective.as_ref(), Rank::ZERO)?;
        let layout = BucketLayout::plan(&trainable_params(&model), buckets);
        let buffers = (0..layout.buckets.len())
            .map(|b| vec![0.0; layout.buffer_len(b)])
            .collect();
        let ddp = Self {
            collective,
            layout,
            buffers,
            pending: 0,
        };
        Ok((model, ddp))
    }

    /// The collective this replica synchronises through.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// The gradient buckets, in all-reduce order.
    pub fn buckets(&self) -> &[GradientBucket] {
        &self.layout.buckets
    }

    /// Adds this micro-batch's gradients to the local accumulator without communicating
    /// (PyTorch's `no_sync`). The next [`sync`](Self::sync) averages the sum over ranks.
    ///
    /// # Errors
    /// When a gradient cannot be read back from its device, or belongs to a parameter the
    /// buckets do not know.
    pub fn accumulate<M: Module>(&mut self, model: &M, grads: GradientsParams) -> Result<()> {
        self.add_local(model, grads)?;
        self.pending += 1;
        Ok(())
    }

    /// Adds `grads` to the accumulated gradients, averages the sum over all ranks, and returns
    /// it for the optimizer; every rank gets bit-identical gradients.
    ///
    /// A parameter gets a gradient when any rank had one for it (a rank without one contributes
    /// zeros, as its samples would on a single device).
    ///
    /// # Errors
    /// When a collective fails (timeout, failed peer), a gradient cannot be read back, or a
    /// gradient belongs to a parameter the buckets do not know.
    pub fn sync<M: Module>(
        &mut self,
        model: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let mut grads = self.add_local(model, grads)?;
        self.pending = 0;
        if self.collective.world_size().get() > 1 {
            for buffer in &mut self.buffers {
                self.collective.all_reduce(buffer, ReduceOp::Avg)?;
            }
        }
        unflatten_grads(model, &self.layout, &self.buffers, &mut grads);
        Ok(grads)
    }

    /// Moves `grads` into the bucket buffers (copied for the first micro-batch since the last
    /// sync, added after), and returns the emptied container.
    fn add_local<M: Module>(
        &mut self,
        model: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let first = self.pending == 0;
        flatten_grads(model, &self.layout, &mut grads, &mut self.buffers, first)?;
        ensure_all_placed(
            &grads,
            "synchronising gradients",
            "DistributedDataParallel::new",
        )?;
        Ok(grads)
    }
}

/// Overwrites every floating-point parameter of `model` with `root`'s values.
///
/// # Errors
/// When the broadcast fails or the ranks' models have different sizes.
pub fn broadcast_module<M: Module>(model: M, collective: &dyn Collective, root: Rank) -> Result<M> {
    if collective.world_size().get() == 1 {
        return Ok(model);
    }
    let mut flat = flatten_params(&model)?;
    collective.broadcast(&mut flat, root)?;
    if collective.rank() == root {
        Ok(model)
    } else {
        load_params(model, &flat)
    }
}
