//! Gradient buckets averaged by kiln's NCCL engine in the GPUs' own memory (feature `cuda`),
//! for ranks in one process and ranks in several (MPI) alike; Burn's all-reduce
//! ([`BurnAllReduce`](super::BurnAllReduce)) serves one process only, and the host path copies
//! each bucket to the host and back.
//!
//! A bucket is a Burn tensor on a CUDA device: through Burn's fusion layer to CubeCL's tensor,
//! whose buffer CubeCL lends as a raw device pointer (`get_resource`) that NCCL reduces in
//! place; the buffer is then registered with the fusion layer again as a new tensor.

use std::sync::Arc;

use burn::backend::fusion::stream::StreamId;
use burn::backend::fusion::{FusionBackend, FusionTensor, NoOp};
use burn::backend::ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};
use burn::backend::{Backend, Cuda, DType, TensorMetadata};
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

use super::device_buckets::DeviceReduce;
use crate::collective::nccl::NcclCollective;
use crate::collective::{Collective, ReduceOp, VERIFY_LENGTHS, VerifyReport};
use crate::error::{MultiError, Result};

/// CubeCL's CUDA server, whose storage lends device pointers.
type CudaServer = <CudaRuntime as Runtime>::Server;

/// Averages each bucket with NCCL in the GPU memory Burn's tensor already occupies: no copy
/// through the host, one NCCL call per bucket. Every rank of the group passes its buckets in
/// the same order (the data-parallel layout does).
pub struct NcclDeviceReduce(Arc<dyn Collective>);

impl NcclDeviceReduce {
    /// On `collective`'s NCCL engine; `None` when it is another engine.
    pub fn new(collective: Arc<dyn Collective>) -> Option<Self> {
        collective.nccl().is_some().then_some(Self(collective))
    }

    fn engine(&self) -> Result<&NcclCollective> {
        self.0
            .nccl()
            .ok_or_else(|| bucket_error("the collective is not NCCL's".into()))
    }
}

impl DeviceReduce for NcclDeviceReduce {
    fn all_reduce_mean(&self, bucket: Tensor<1>) -> Result<Tensor<1>> {
        let engine = self.engine()?;
        in_gpu_memory(bucket, |ptr, len| {
            // SAFETY: `in_gpu_memory` passes the pointer and length of the bucket's own
            // buffer, held by nothing else, on this rank's GPU, once its writes are done.
            unsafe { engine.all_reduce_device(ptr, len, ReduceOp::Avg) }
        })
    }

    fn describe(&self) -> &'static str {
        "gradient buckets built and averaged on the GPUs (NCCL in device memory)"
    }
}

fn bucket_error(detail: String) -> MultiError {
    MultiError::Tensor {
        context: "averaging a gradient bucket in GPU memory".into(),
        detail,
    }
}

/// Runs `f` on the CUDA memory of the `f32` tensor `tensor`: its device pointer and length,
/// once every write to it is complete, and with no other tensor sharing the buffer (a copy is
/// made where one does). Returns the tensor holding what `f` left in that memory.
///
/// # Errors
/// `tensor` is not `f32` or not on a CUDA device; the GPU failed; `f`'s error.
fn in_gpu_memory(tensor: Tensor<1>, f: impl FnOnce(u64, usize) -> Result<()>) -> Result<Tensor<1>> {
    if tensor.dtype() != DType::F32 {
        return Err(bucket_error(format!(
            "the bucket is {:?}, not f32",
            tensor.dtype()
        )));
    }
    let fused = tensor
        .try_into_primitive::<Cuda>()
        .map_err(|e| bucket_error(format!("not a CubeCL tensor: {e:?}")))?;
    let client = fused.client.clone();
    let mut cube = client.resolve_tensor_float::<CubeBackend>(fused);
    if !(cube.can_mut() && cube.is_contiguous()) {
        cube = cube.copy();
    }
    let shape = TensorMetadata::shape(&cube);
    let len = shape.num_elements();
    let outcome = match cube.client.get_resource::<CudaServer>(cube.handle.clone()) {
        Ok(memory) => <CubeBackend as Backend>::sync(&cube.device)
            .map_err(|e| bucket_error(format!("the GPU failed before the all-reduce: {e:?}")))
            .and_then(|()| f(memory.resource().ptr, len)),
        Err(e) => Err(bucket_error(format!("not in CUDA memory: {e:?}"))),
    };
    let handle = <CubeBackend as BackendIr>::float_tensor_handle(cube);
    let desc = InitOperationIr::create(shape, DType::F32, || client.register_tensor_handle(handle));
    let fused: FusionTensor<<CubeBackend as FusionBackend>::FusionRuntime> = client
        .register(
            StreamId::current(),
            OperationIr::Init(desc),
            NoOp::<CubeBackend>::new(),
        )
        .output();
    outcome.map(|()| Tensor::from_primitive::<Cuda>(fused))
}

/// Checks [`NcclDeviceReduce`] on `collective` (NCCL's) against closed-form means: for each
/// non-empty length of [`VERIFY_LENGTHS`], rank `r` puts `(r + 1) * (i % 7 + 1)` at index `i`
/// of a tensor on `device` (this rank's GPU), and the averaged tensor, read back, must hold
/// `(n + 1) / 2 * (i % 7 + 1)` within one part in a million. All ranks call it together.
///
/// # Errors
/// [`MultiError::Mismatch`] naming the length and first wrong element; `collective` is not
/// NCCL's; any error of the exchange or the device.
pub fn verify_device_all_reduce(
    collective: &Arc<dyn Collective>,
    device: &burn::tensor::Device,
) -> Result<VerifyReport> {
    let reduce = NcclDeviceReduce::new(Arc::clone(collective))
        .ok_or_else(|| bucket_error("the collective is not NCCL's".into()))?;
    let (n, rank) = (collective.world_size().get(), collective.rank().index());
    let mut report = VerifyReport {
        calls: 0,
        elements: 0,
    };
    for len in VERIFY_LENGTHS.into_iter().filter(|&len| len > 0) {
        let values: Vec<f32> = (0..len)
            .map(|i| ((rank + 1) * (i % 7 + 1)) as f32)
            .collect();
        let bucket = Tensor::<1>::from_data(TensorData::new(values, [len]), device);
        let averaged = reduce.all_reduce_mean(bucket)?;
        let got = averaged
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| bucket_error(format!("reading the averaged bucket back: {e:?}")))?;
        if got.len() != len {
            return Err(bucket_error(format!(
                "{len} values went in, {} came back",
                got.len()
            )));
        }
        let want = |i: usize| (n + 1) as f32 / 2.0 * (i % 7 + 1) as f32;
        // A NaN is wrong too: the difference must be known to be within the tolerance.
        let close = |i: usize| (got[i] - want(i)).abs() <= 1e-6 * want(i);
        let wrong = (0..len).find(|&i| !close(i));
        if let Some(i) = wrong {
            return Err(MultiError::Mismatch {
                rank,
                op: "all_reduce (GPU memory)",
                detail: format!(
                    "length {len}: element {i} is {}, the closed-form mean is {}",
                    got[i],
                    want(i)
                ),
            });
        }
        report.calls += 1;
        report.elements += len;
    }
    Ok(report)
}
