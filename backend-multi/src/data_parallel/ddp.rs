use std::sync::Arc;

use burn::module::Module;
use burn::optim::GradientsParams;

use super::bucket::{BucketConfig, BucketLayout, GradientBucket};
use super::device_buckets::{DeviceReduce, HostStaged, sync_on_device};
use super::overlap::{self, Inflight};
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
/// On Flex, [`hook`](Self::hook) before the forward pass returns the replica with a gradient
/// hook on every parameter: each bucket is all-reduced by a communication thread as soon as
/// backward has produced its gradients, while backward goes on (PyTorch's reducer). Run the
/// forward and backward on the hooked model, take its gradients
/// (`GradientsParams::from_grads(grads, &hooked)`: the hooked parameters have none there,
/// theirs went to the buckets), and [`sync`](Self::sync) waits for the buckets and returns
/// the same bits as without the hook. Buckets are laid out in reverse registration order,
/// the order backward produces gradients. Off unless `KILN_DDP_OVERLAP=1` (or
/// [`set_overlap`](Self::set_overlap)): it pays on slow links (two MPI processes over a
/// 2 Gbit/s link: 13-18 % more samples/s) and costs up to ~10 % where the exchange is CPU work
/// on cores that backward already fills (thread ranks on 2 cores); see the README.
pub struct DistributedDataParallel {
    collective: Arc<dyn Collective>,
    layout: BucketLayout,
    buffers: Vec<Vec<f32>>,
    /// Micro-batches added to `buffers` since the last sync.
    pending: usize,
    /// Whether [`hook`](Self::hook) hooks (else it returns `None`).
    overlap: bool,
    /// Whether the replica is on Flex, where the gradient hook op exists.
    on_flex: bool,
    /// The overlapped synchronisation of the step under way.
    inflight: Option<Inflight>,
    /// Off the CPU: buckets built on the device and averaged by this (see
    /// [`set_device_reduce`](Self::set_device_reduce)).
    device_reduce: Option<Arc<dyn DeviceReduce>>,
}

/// Whether data parallelism overlaps its all-reduce with backward unless told otherwise:
/// when `KILN_DDP_OVERLAP` is `1` or `on` (off by default, see [`DistributedDataParallel`]).
pub fn overlap_by_default() -> bool {
    matches!(std::env::var("KILN_DDP_OVERLAP").as_deref(), Ok("1" | "on"))
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
        let buffers = layout.zeroed_buffers();
        // A model without trainable parameters has nothing to synchronise anywhere.
        let on_flex = trainable_device(&model).is_none_or(|device| kiln_kernels::on_flex(&device));
        let device_reduce = (!on_flex).then(|| device_reduce_for(&collective)).flatten();
        let ddp = Self {
            collective,
            layout,
            buffers,
            pending: 0,
            overlap: overlap_by_default(),
            on_flex,
            inflight: None,
            device_reduce,
        };
        Ok((model, ddp))
    }

    /// Turns the overlap of all-reduce and backward on or off (see the type's docs).
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on;
    }

    /// Whether the all-reduce overlaps backward: overlap on, several ranks, and the replica
    /// on Flex, where the hook op exists.
    pub fn overlaps(&self) -> bool {
        self.overlap && self.on_flex && self.collective.world_size().get() > 1
    }

    /// Starts this step's synchronisation before its forward pass: `model` with a gradient
    /// hook on every parameter, whose buckets are all-reduced while backward runs. `None`
    /// (synchronise after backward as usual) when overlap is off, there is one rank,
    /// micro-batches are being accumulated, or the model is not on Flex in `f32`.
    pub fn hook<M: Module>(&mut self, model: &M) -> Option<M> {
        if !self.overlaps() || self.pending > 0 || self.inflight.is_some() {
            return None;
        }
        let mut buffers = std::mem::take(&mut self.buffers);
        buffers.iter_mut().for_each(|b| b.fill(0.0));
        match overlap::start(model, &self.layout, buffers, Arc::clone(&self.collective)) {
            Ok((hooked, inflight)) => {
                self.inflight = Some(inflight);
                Some(hooked)
            }
            Err(buffers) => {
                self.buffers = buffers;
                None
            }
        }
    }

    /// How buckets are averaged off the CPU: `Some` builds each bucket on the device and
    /// averages it with `reduce` ([`HostStaged`]: through the collective, one transfer each
    /// way per bucket, the default off the CPU with `KILN_DEVICE_BUCKETS=1`;
    /// [`BurnAllReduce`](super::BurnAllReduce): on the devices), `None` reads every gradient
    /// back on its own (the default).
    pub fn set_device_reduce(&mut self, reduce: Option<Arc<dyn DeviceReduce>>) {
        self.device_reduce = reduce;
    }

    /// How this replica's gradients are averaged, in words (for reports).
    pub fn sync_path(&self) -> &'static str {
        self.sync_note()
            .unwrap_or("gradients read back per parameter, averaged through the host")
    }

    /// [`sync_path`](Self::sync_path) where it is not the default (reports name only those).
    pub fn sync_note(&self) -> Option<&'static str> {
        if self.overlaps() {
            return Some("all-reduce overlapped with backward");
        }
        self.device_reduce.as_ref().map(|reduce| reduce.describe())
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
        if let Some(inflight) = self.inflight.take() {
            return self.finish_overlap(model, inflight, grads);
        }
        if let (Some(reduce), 0) = (&self.device_reduce, self.pending)
            && self.collective.world_size().get() > 1
        {
            return sync_on_device(model, &self.layout, reduce.as_ref(), grads);
        }
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

    /// The end of a hooked step: the averaged buckets into `grads`, which must hold no
    /// gradient of a hooked parameter (they went to the buckets during backward).
    fn finish_overlap<M: Module>(
        &mut self,
        model: &M,
        inflight: Inflight,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let finished = inflight.finish();
        let buffers = match finished {
            Ok(buffers) => buffers,
            Err(e) => {
                self.buffers = self.layout.zeroed_buffers();
                return Err(e);
            }
        };
        self.buffers = buffers;
        self.pending = 0;
        ensure_all_placed(
            &grads,
            "synchronising hooked gradients (take them from the hooked model)",
            "DistributedDataParallel::new",
        )?;
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

/// Whether replicas off the CPU build their gradient buckets on the device (averaged through
/// the host) unless told otherwise: when `KILN_DEVICE_BUCKETS` is `1` or `on`. Off by
/// default: on Mesa's software Vulkan driver it measured 8-12 % slower than reading each
/// gradient back (a cat and slices cost more there than the copies they save), and it has
/// not run on a GPU, where it should pay (one transfer per bucket instead of per parameter).
pub fn device_buckets_by_default() -> bool {
    matches!(
        std::env::var("KILN_DEVICE_BUCKETS").as_deref(),
        Ok("1" | "on")
    )
}

/// Where replicas off the CPU average their gradient buckets, from `KILN_DEVICE_ALL_REDUCE`:
/// on the devices, or (the default) through the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAllReduce {
    /// Through the host (unset, or any other value).
    Off,
    /// kiln's NCCL engine in the buckets' GPU memory (`1`, `on` or `nccl`): ranks that are
    /// threads of one process, and ranks that are processes (`kiln launch`) alike.
    Nccl,
    /// Burn's all-reduce (`burn`): CUDA ranks that are threads of one process.
    Burn,
}

impl DeviceAllReduce {
    /// The choice `KILN_DEVICE_ALL_REDUCE` makes.
    pub fn from_env() -> Self {
        Self::from_value(std::env::var("KILN_DEVICE_ALL_REDUCE").ok().as_deref())
    }

    /// The choice a value of `KILN_DEVICE_ALL_REDUCE` (`None`: unset) makes.
    pub fn from_value(value: Option<&str>) -> Self {
        match value {
            Some("1" | "on" | "nccl") => Self::Nccl,
            Some("burn") => Self::Burn,
            _ => Self::Off,
        }
    }
}

/// How a replica off the CPU averages its buckets unless told otherwise: in GPU memory by
/// NCCL when asked and the collective is NCCL's, through the host with the buckets built on
/// the device when `KILN_DEVICE_BUCKETS` asks, else `None` (each gradient read back).
fn device_reduce_for(collective: &Arc<dyn Collective>) -> Option<Arc<dyn DeviceReduce>> {
    #[cfg(feature = "cuda")]
    if DeviceAllReduce::from_env() == DeviceAllReduce::Nccl
        && let Some(nccl) = super::NcclDeviceReduce::new(Arc::clone(collective))
    {
        return Some(Arc::new(nccl));
    }
    device_buckets_by_default()
        .then(|| Arc::new(HostStaged(Arc::clone(collective))) as Arc<dyn DeviceReduce>)
}

/// The device of `model`'s first trainable parameter, without autodiff.
fn trainable_device<M: Module>(model: &M) -> Option<burn::tensor::Device> {
    struct First(Option<burn::tensor::Device>);
    impl burn::module::ModuleVisitor for First {
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            if self.0.is_none() && param.is_require_grad() {
                self.0 = Some(param.val().device().without_autodiff());
            }
        }
    }
    let mut first = First(None);
    model.visit(&mut first);
    first.0
}

#[cfg(test)]
mod tests {
    use super::DeviceAllReduce;

    #[test]
    fn device_all_reduce_values_name_the_engine_and_anything_else_stays_on_the_host() {
        let cases = [
            (None, DeviceAllReduce::Off),
            (Some("0"), DeviceAllReduce::Off),
            (Some("1"), DeviceAllReduce::Nccl),
            (Some("on"), DeviceAllReduce::Nccl),
            (Some("nccl"), DeviceAllReduce::Nccl),
            (Some("burn"), DeviceAllReduce::Burn),
            (Some("NCCL"), DeviceAllReduce::Off),
        ];
        for (value, want) in cases {
            assert_eq!(DeviceAllReduce::from_value(value), want, "{value:?}");
        }
    }
}
