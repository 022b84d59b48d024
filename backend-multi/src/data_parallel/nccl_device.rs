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
use crate::collective::{Collective, ReduceOp, VERIFY_LENGTHS, VerifyReport, verify};
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
        let [len] = bucket.dims();
        let reduce = |ptr, len| {
            // SAFETY: `in_gpu_memory` passes the pointer and length of the bucket's own
            // buffer, held by nothing else, on this rank's GPU, once its writes are done.
            unsafe { engine.all_reduce_device(ptr, len, ReduceOp::Avg) }.map_err(|error| Failure {
                error,
                // A timed-out or unobserved NCCL call may still write the buffer.
                memory_in_use: engine.is_broken(),
            })
        };
        match in_gpu_memory(bucket, engine.ordinal(), reduce) {
            Ok(averaged) => Ok(averaged),
            Err(Before(error)) => {
                // The other ranks are about to agree on this call: make them fail with it.
                engine.refuse_device(len, ReduceOp::Avg)?;
                Err(error)
            }
            Err(During(error)) => Err(error),
        }
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

/// Why the function [`in_gpu_memory`] runs failed, and whether the GPU may still be using the
/// memory (then the buffer is never freed: it is left to the failing job).
struct Failure {
    error: MultiError,
    memory_in_use: bool,
}

/// When [`in_gpu_memory`] failed: before its function ran, or in it.
enum Failed {
    Before(MultiError),
    During(MultiError),
}
use Failed::{Before, During};

/// Runs `f` on the CUDA memory of the `f32` tensor `tensor`, which must be on GPU `ordinal`:
/// its device pointer and length, once every write to it is complete, and with no other
/// tensor sharing the buffer (a copy is made where one does). Returns the tensor holding what
/// `f` left in that memory.
///
/// # Errors
/// [`Failed::Before`] `f` ran: `tensor` is not `f32`, not on CUDA GPU `ordinal`, or the GPU
/// failed; [`Failed::During`] it: `f`'s error.
fn in_gpu_memory(
    tensor: Tensor<1>,
    ordinal: usize,
    f: impl FnOnce(u64, usize) -> std::result::Result<(), Failure>,
) -> std::result::Result<Tensor<1>, Failed> {
    if tensor.dtype() != DType::F32 {
        let error = format!("the bucket is {:?}, not f32", tensor.dtype());
        return Err(Before(bucket_error(error)));
    }
    let fused = tensor
        .try_into_primitive::<Cuda>()
        .map_err(|e| Before(bucket_error(format!("not a CubeCL tensor: {e:?}"))))?;
    let client = fused.client.clone();
    // Burn panics where a failed kernel claimed the buffer (e.g. the bucket's `cat` ran out
    // of memory): an error here, since every rank must hear of it.
    let resolved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        client.resolve_tensor_float::<CubeBackend>(fused)
    }));
    let mut cube = resolved.map_err(|_| {
        Before(bucket_error(
            "the GPU could not produce the bucket (see the panic above)".into(),
        ))
    })?;
    if !matches!(&cube.device, cubecl::Device::Cuda(d) if d.index == ordinal) {
        let error = format!("it is on {:?}, NCCL runs on cuda:{ordinal}", cube.device);
        return Err(Before(bucket_error(error)));
    }
    if !(cube.can_mut() && cube.is_contiguous()) {
        cube = cube.copy();
    }
    let shape = TensorMetadata::shape(&cube);
    let len = shape.num_elements();
    let memory = cube
        .client
        .get_resource::<CudaServer>(cube.handle.clone())
        .map_err(|e| Before(bucket_error(format!("not in CUDA memory: {e:?}"))))?;
    <CubeBackend as Backend>::sync(&cube.device).map_err(|e| {
        Before(bucket_error(format!(
            "the GPU failed before the all-reduce: {e:?}"
        )))
    })?;
    if let Err(failure) = f(memory.resource().ptr, len) {
        if failure.memory_in_use {
            // Neither freed nor handed out again while NCCL may still write it.
            std::mem::forget(memory);
            std::mem::forget(cube);
        }
        return Err(During(failure.error));
    }
    drop(memory);
    let dtype = cube.dtype;
    let handle = <CubeBackend as BackendIr>::float_tensor_handle(cube);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let fused: FusionTensor<<CubeBackend as FusionBackend>::FusionRuntime> = client
        .register(
            StreamId::current(),
            OperationIr::Init(desc),
            NoOp::<CubeBackend>::new(),
        )
        .output();
    Ok(Tensor::from_primitive::<Cuda>(fused))
}

/// Checks [`NcclDeviceReduce`] on `collective` (NCCL's) against closed-form means: for each
/// non-empty length of [`VERIFY_LENGTHS`], rank `r` puts the self-test's `(r + 1) * (i % 7 +
/// 1)` at index `i` of a tensor on `device` (this rank's GPU), and the averaged tensor, read
/// back, must hold `(n + 1) / 2 * (i % 7 + 1)` within 1e-5 of it (NCCL scales by 1/n, then
/// sums). All ranks call it together.
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
        let values: Vec<f32> = (0..len).map(|i| verify::value(rank, i)).collect();
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
        let close = |i: usize| (got[i] - want(i)).abs() <= 1e-5 * want(i);
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
