//! Gradient buckets built on the model's device, for replicas off the CPU (CUDA, wgpu).
//!
//! The host path reads every gradient back on its own (one device-to-host transfer and one
//! wait per parameter: 62 for a ResNet-18). Here each bucket is concatenated on the device
//! (gradients in bucket order, then one presence flag per parameter, the host layout), then
//! reduced by a [`DeviceReduce`]: over the host collective with one transfer each way per
//! bucket ([`HostStaged`]), or on the devices themselves by Burn's all-reduce where the backend
//! has one ([`BurnAllReduce`]: CubeCL's CUDA runtime, NCCL on device memory). The averaged
//! bucket is sliced back into gradients on the device.

use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use super::bucket::BucketLayout;
use super::params::{ensure_all_placed, read_f32};
use crate::collective::{Collective, ReduceOp};
use crate::error::{MultiError, Result};

/// Averages one flat bucket (a 1-D `f32` tensor on this rank's device) over the ranks.
pub trait DeviceReduce: Send + Sync {
    /// The bucket averaged over every rank, on the same device.
    ///
    /// # Errors
    /// When the exchange fails (timeout, failed peer) or the values cannot be read back.
    fn all_reduce_mean(&self, bucket: Tensor<1>) -> Result<Tensor<1>>;

    /// What the run reports: where the gradients are averaged.
    fn describe(&self) -> &'static str;
}

/// Through the host collective: one read-back and one upload per bucket.
pub struct HostStaged(pub Arc<dyn Collective>);

impl DeviceReduce for HostStaged {
    fn all_reduce_mean(&self, bucket: Tensor<1>) -> Result<Tensor<1>> {
        let device = bucket.device();
        let mut values = read_f32(bucket, || "reading a gradient bucket back".into())?;
        self.0.all_reduce(&mut values, ReduceOp::Avg)?;
        let len = values.len();
        Ok(Tensor::from_data(TensorData::new(values, [len]), &device))
    }

    fn describe(&self) -> &'static str {
        "gradient buckets built on the device, averaged through the host"
    }
}

/// On the devices: Burn's `all_reduce` (CubeCL's CUDA runtime: NCCL on device memory, inside
/// one process). Every rank's thread passes its bucket with the same device list.
pub struct BurnAllReduce {
    /// Every rank's device, in rank order.
    pub devices: Vec<Device>,
}

impl DeviceReduce for BurnAllReduce {
    fn all_reduce_mean(&self, bucket: Tensor<1>) -> Result<Tensor<1>> {
        use burn::tensor::distributed::{ReduceOperation, all_reduce};
        Ok(all_reduce(bucket, ReduceOperation::Mean, self.devices.clone()).resolve())
    }

    fn describe(&self) -> &'static str {
        "gradient buckets built and averaged on the devices (Burn's all-reduce)"
    }
}

/// Averages `grads` over the ranks bucket by bucket on the device, and returns them with a
/// gradient for every parameter that some rank had one for.
///
/// # Errors
/// When a reduction fails, or the flags cannot be read back.
pub(crate) fn sync_on_device<M: Module>(
    model: &M,
    layout: &BucketLayout,
    reduce: &dyn DeviceReduce,
    mut grads: GradientsParams,
) -> Result<GradientsParams> {
    let mut parts = Parts::new(layout);
    model.visit(&mut Take {
        layout,
        grads: &mut grads,
        parts: &mut parts,
    });
    ensure_all_placed(
        &grads,
        "synchronising gradients",
        "DistributedDataParallel::new",
    )?;
    let device = parts.device.clone().ok_or_else(|| MultiError::Tensor {
        context: "synchronising gradients on the device".into(),
        detail: "no trainable parameter was found on a device".into(),
    })?;
    let mut reduced = Vec::with_capacity(layout.buckets.len());
    for (b, bucket) in parts.buckets.into_iter().enumerate() {
        let flat = flat_bucket(bucket, &parts.flags[b], layout, b, &device);
        let averaged = reduce.all_reduce_mean(flat)?;
        let elements = layout.buckets[b].elements();
        let flags = read_f32(averaged.clone().slice(elements..), || {
            "reading the gradient flags back".into()
        })?;
        reduced.push((averaged, flags));
    }
    model.visit(&mut Put {
        layout,
        reduced: &reduced,
        grads: &mut grads,
    });
    Ok(grads)
}

/// Each bucket's gradients (flattened, in bucket order; `None` where this rank has none),
/// and whether each was present.
struct Parts {
    buckets: Vec<Vec<Option<Tensor<1>>>>,
    flags: Vec<Vec<f32>>,
    device: Option<Device>,
}

impl Parts {
    fn new(layout: &BucketLayout) -> Self {
        let sizes = layout.buckets.iter().map(|b| b.params().len());
        Self {
            buckets: sizes.clone().map(|n| vec![None; n]).collect(),
            flags: sizes.map(|n| vec![0.0; n]).collect(),
            device: None,
        }
    }
}

/// The bucket as one tensor: each gradient (zeros where missing), then the flags.
fn flat_bucket(
    parts: Vec<Option<Tensor<1>>>,
    flags: &[f32],
    layout: &BucketLayout,
    bucket: usize,
    device: &Device,
) -> Tensor<1> {
    let ids = layout.buckets[bucket].params();
    let mut pieces: Vec<Tensor<1>> = parts
        .into_iter()
        .zip(ids)
        .map(|(grad, id)| {
            grad.unwrap_or_else(|| Tensor::zeros([layout.placements[id].elements], device))
        })
        .collect();
    pieces.push(Tensor::from_data(
        TensorData::new(flags.to_vec(), [flags.len()]),
        device,
    ));
    Tensor::cat(pieces, 0)
}

/// Takes the planned parameters' gradients out of `grads`, flattened.
struct Take<'a> {
    layout: &'a BucketLayout,
    grads: &'a mut GradientsParams,
    parts: &'a mut Parts,
}

impl ModuleVisitor for Take<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(place) = self.layout.placements.get(&param.id) else {
            return;
        };
        if self.parts.device.is_none() {
            self.parts.device = Some(param.val().device().without_autodiff());
        }
        // The flag's place after the gradients is the parameter's index in its bucket.
        let k = place.flag - self.layout.buckets[place.bucket].elements();
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.parts.buckets[place.bucket][k] = Some(grad.reshape([place.elements]));
            self.parts.flags[place.bucket][k] = 1.0;
        }
    }
}

/// Registers each parameter's averaged gradient (where a rank had one), sliced from its bucket.
struct Put<'a> {
    layout: &'a BucketLayout,
    reduced: &'a [(Tensor<1>, Vec<f32>)],
    grads: &'a mut GradientsParams,
}

impl ModuleVisitor for Put<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(place) = self.layout.placements.get(&param.id) else {
            return;
        };
        let (bucket, flags) = &self.reduced[place.bucket];
        let k = place.flag - self.layout.buckets[place.bucket].elements();
        if flags[k] == 0.0 {
            return;
        }
        let grad: Tensor<D> = bucket
            .clone()
            .slice(place.offset..place.offset + place.elements)
            .reshape(param.lazy_shape());
        self.grads.register(param.id, grad);
    }
}
