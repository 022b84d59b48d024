//! The NCCL engine (feature `cuda`): collectives between CUDA GPUs over NVIDIA's NCCL, through
//! `cudarc` (libcuda and libnccl are opened at run time, so building needs neither).
//!
//! Every NCCL rank is paired with a *control* handle of the same rank on another engine (the
//! in-process engine for ranks that are threads, MPI for ranks that are processes). The control
//! group carries NCCL's unique id from rank 0 to the others at setup, and before every call an
//! agreement on (operation, length, root, whether this rank's arguments are valid), as the MPI
//! engine does: ranks that disagree, pass a wrong shard, or have died get an error on every
//! rank, within the control group's timeout, before NCCL is called (NCCL itself would hang on
//! the GPU). A call that still does not complete within the timeout fails, and the group is
//! then unusable (NCCL cannot cancel a launched collective).
//!
//! The [`Collective`] trait works on host buffers, so each call copies the buffer to the GPU,
//! runs the NCCL collective there and copies the result back. Uneven shards (the trait's
//! [`shard_range`]) are padded to NCCL's equal blocks. [`NcclCollective::all_reduce_device`]
//! reduces GPU memory in place instead (a Burn tensor's buffer: see
//! [`NcclDeviceReduce`](crate::data_parallel::NcclDeviceReduce)), with the same agreement.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};

use super::base::{Collective, ReduceOp, shard_range};
use super::blocks::{block_len, from_blocks, to_blocks};
use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// An NCCL communicator, owned by one rank's [`NcclCollective`].
struct CommCell(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at
// once; it lives behind the collective's mutex. NCCL selects the communicator's GPU itself on
// every call, and its buffers are pointers in that GPU's primary context (cudarc's and
// CubeCL's).
unsafe impl Send for CommCell {}

/// One rank of a group of CUDA GPUs talking over NCCL.
pub struct NcclCollective {
    comm: Mutex<CommCell>,
    stream: Arc<CudaStream>,
    control: Arc<dyn Collective>,
    timeout: Duration,
    rank: Rank,
    world: WorldSize,
    ordinal: usize,
    /// Set when a call timed out: the communicator may still be running it.
    broken: Mutex<Option<String>>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank.index())
            .field("world_size", &self.world.get())
            .field("cuda", &self.ordinal)
            .finish()
    }
}

const ALL_REDUCE: u32 = 1;
/// The name of an all-reduce in GPU memory, in errors.
const DEVICE_ALL_REDUCE: &str = "all_reduce (GPU memory)";
const BROADCAST: u32 = 2;
const ALL_GATHER: u32 = 3;
const REDUCE_SCATTER: u32 = 4;

fn op_code(base: u32, op: ReduceOp) -> u32 {
    base * 4
        + match op {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
        }
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

impl NcclCollective {
    /// Joins the NCCL group of `control`'s ranks, this rank on GPU `ordinal`: rank 0 creates
    /// NCCL's unique id and broadcasts it over `control`; every rank then initialises its
    /// communicator (which waits for all of them). All ranks of `control` call it together.
    ///
    /// # Errors
    /// [`MultiError::Device`] when libcuda or libnccl is missing or the GPU cannot be opened;
    /// [`MultiError::Nccl`] when NCCL fails; the control group's errors.
    pub fn join(control: Arc<dyn Collective>, ordinal: usize, timeout: Duration) -> Result<Self> {
        let (rank, world) = (control.rank(), control.world_size());
        let device = format!("cuda:{ordinal}");
        // SAFETY: these only try to open the libraries with libloading.
        let (driver, nccl) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nccl::sys::is_culib_present(),
            )
        };
        // The GPU is opened before the ranks agree to go on, so that a rank that cannot open
        // it stops every rank here rather than leaving them in NCCL's initialisation, which
        // waits for all ranks without a timeout.
        let opened: std::result::Result<Arc<CudaStream>, String> = if !driver {
            Err("the NVIDIA driver library (libcuda.so) is not installed".to_string())
        } else if !nccl {
            Err(
                "the NCCL library (libnccl.so.2) was not found: install it (for example \
                 `pip install nvidia-nccl-cu12`) and add its lib folder to LD_LIBRARY_PATH"
                    .to_string(),
            )
        } else {
            CudaContext::new(ordinal)
                .and_then(|context| context.new_stream())
                .map_err(|e| format!("CUDA error: {e}"))
        };
        // Every rank learns whether every other could start: the maximum of the negated flags
        // is minus the smallest flag.
        let can_start = if opened.is_ok() { 1.0 } else { 0.0 };
        let mut flags = [can_start, -can_start];
        control.all_reduce(&mut flags, ReduceOp::Max)?;
        let stream = opened.map_err(|reason| MultiError::Device { device, reason })?;
        if -flags[1] != 1.0 {
            return Err(MultiError::PeerFailed {
                rank: rank.index(),
                op: "nccl setup",
                reason: "another rank cannot use its GPU or NCCL (see its error)".to_string(),
            });
        }
        let nccl_error = |op: &'static str| {
            move |e: cudarc::nccl::result::NcclError| MultiError::Nccl {
                rank: rank.index(),
                op,
                detail: format!("{e:?}"),
            }
        };
        let mut id_bytes = vec![0.0f32; 128];
        if rank == Rank::ZERO {
            let id = Id::new().map_err(nccl_error("creating the NCCL id"))?;
            for (v, b) in id_bytes.iter_mut().zip(id.internal()) {
                *v = f32::from(*b as u8);
            }
        }
        control.broadcast(&mut id_bytes, Rank::ZERO)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (b, v) in internal.iter_mut().zip(&id_bytes) {
            *b = *v as u8 as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            Arc::clone(&stream),
            rank.index(),
            world.get(),
            Id::uninit(internal),
        )
        .map_err(nccl_error("initialising the communicator"))?;
        Ok(Self {
            comm: Mutex::new(CommCell(comm)),
            stream,
            control,
            timeout,
            rank,
            world,
            ordinal,
            broken: Mutex::new(None),
        })
    }

    /// The GPU this rank runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Agrees with every rank, over the control group, on the call about to be made; every
    /// rank fails when any disagrees or passed invalid arguments.
    fn agree(
        &self,
        op: &'static str,
        code: u32,
        len: usize,
        root: usize,
        valid: bool,
    ) -> Result<()> {
        if let Some(reason) = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(MultiError::PeerFailed {
                rank: self.rank.index(),
                op,
                reason,
            });
        }
        // Exact in f32: every field below 2^24.
        let fields = [
            code as f32,
            (len >> 20) as f32,
            (len & ((1 << 20) - 1)) as f32,
            root as f32,
            if valid { 1.0 } else { 0.0 },
        ];
        let mut header: Vec<f32> = fields
            .iter()
            .copied()
            .chain(fields.iter().map(|x| -x))
            .collect();
        self.control.all_reduce(&mut header, ReduceOp::Max)?;
        let (max, neg_min) = header.split_at(fields.len());
        if !valid {
            return Ok(()); // the caller reports this rank's own bad buffer
        }
        if max[4] != -neg_min[4] {
            return Err(MultiError::PeerFailed {
                rank: self.rank.index(),
                op,
                reason: "another rank passed a buffer of the wrong length (see its error)"
                    .to_string(),
            });
        }
        let differs = |i: usize| max[i] != -neg_min[i];
        if differs(0) {
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail: "ranks called different collectives".to_string(),
            });
        }
        if differs(1) || differs(2) {
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail: "ranks passed buffers of different lengths".to_string(),
            });
        }
        if differs(3) {
            return Err(MultiError::Mismatch {
                rank: self.rank.index(),
                op,
                detail: "ranks named different roots".to_string(),
            });
        }
        Ok(())
    }

    /// [`agree`](Self::agree) for a sharded call: this rank's `shard_len` must be its part of
    /// `len`, or the call fails on every rank (with [`MultiError::BufferLength`] on this one).
    fn agree_shard(&self, op: &'static str, code: u32, len: usize, shard_len: usize) -> Result<()> {
        let mine = shard_range(len, self.world, self.rank);
        let valid = shard_len == mine.len();
        self.agree(op, code, len, 0, valid)?;
        if !valid {
            return Err(MultiError::BufferLength {
                rank: self.rank.index(),
                op,
                expected: mine.len(),
                got: shard_len,
            });
        }
        Ok(())
    }

    fn driver(&self, op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> MultiError {
        let rank = self.rank.index();
        move |e| MultiError::Nccl {
            rank,
            op,
            detail: format!("CUDA error: {e}"),
        }
    }

    /// Runs `launch` on the communicator and waits, up to the timeout, for the GPU to finish it.
    fn launch(
        &self,
        op: &'static str,
        launch: impl FnOnce(&Comm) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        launch(&comm.0).map_err(|e| MultiError::Nccl {
            rank: self.rank.index(),
            op,
            detail: format!("{e:?}"),
        })?;
        // From here the GPU may be running the call: an error leaves the communicator (and
        // the buffers it was given) in an unknown state.
        let unknown = |e| {
            *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "an NCCL {op} was launched but not seen to complete ({e})"
            ));
            self.driver(op)(e)
        };
        let done = self.stream.record_event(None).map_err(unknown)?;
        let start = Instant::now();
        while !done.try_is_complete().map_err(unknown)? {
            if start.elapsed() > self.timeout {
                let reason = format!(
                    "an NCCL {op} did not complete within {:?}; the communicator is unusable",
                    self.timeout
                );
                *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                return Err(MultiError::Timeout {
                    rank: self.rank.index(),
                    op,
                    timeout: self.timeout,
                    missing: Vec::new(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    fn upload(&self, op: &'static str, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(host).map_err(self.driver(op))
    }

    fn download(&self, op: &'static str, device: &CudaSlice<f32>, host: &mut [f32]) -> Result<()> {
        self.stream
            .memcpy_dtoh(device, host)
            .and_then(|()| self.stream.synchronize())
            .map_err(self.driver(op))
    }
}

/// `len` `f32` of GPU memory that someone else owns (a Burn tensor's buffer), as NCCL's calls
/// take it: nothing is recorded or freed when it is dropped.
struct Borrowed {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for Borrowed {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for Borrowed {
    fn device_ptr_mut<'a>(&'a mut self, _: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl NcclCollective {
    /// All-reduces `len` `f32` at `ptr` in this rank's GPU memory, in place, without a copy
    /// through the host; returns once the result is in that memory. Ranks agree on the call
    /// over the control group first, as for [`Collective::all_reduce`] (whose calls match
    /// these: a rank may pass host memory while another passes device memory).
    ///
    /// # Safety
    /// `ptr` must address `len` `f32` on this rank's GPU (`ordinal`), in the CUDA context
    /// CubeCL and cudarc share (the device's primary context), that nothing else reads or
    /// writes until this returns, and whose earlier writes are complete.
    ///
    /// # Errors
    /// As [`Collective::all_reduce`].
    pub unsafe fn all_reduce_device(&self, ptr: u64, len: usize, op: ReduceOp) -> Result<()> {
        const OP: &str = DEVICE_ALL_REDUCE;
        self.agree(OP, op_code(ALL_REDUCE, op), len, 0, true)?;
        if len == 0 {
            return Ok(());
        }
        let mut memory = Borrowed {
            ptr,
            len,
            stream: Arc::clone(&self.stream),
        };
        self.launch(OP, |comm| {
            comm.all_reduce_in_place(&mut memory, &nccl_op(op))
                .map(|_| ())
        })
    }

    /// Takes this rank's part in an [`all_reduce_device`](Self::all_reduce_device) of `len`
    /// elements it cannot make (its buffer could not be had), so that every rank's call
    /// fails: the others' with [`MultiError::PeerFailed`], this one's with the caller's error.
    ///
    /// # Errors
    /// The control group's errors; otherwise `Ok`, and the caller reports its own failure.
    pub fn refuse_device(&self, len: usize, op: ReduceOp) -> Result<()> {
        self.agree(DEVICE_ALL_REDUCE, op_code(ALL_REDUCE, op), len, 0, false)
    }

    /// Whether a call timed out or was not seen to complete: the communicator is unusable,
    /// and the GPU may still be using the buffers of that call.
    pub fn is_broken(&self) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> WorldSize {
        self.world
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        self.agree(OP, op_code(ALL_REDUCE, op), buf.len(), 0, true)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut device = self.upload(OP, buf)?;
        self.launch(OP, |comm| {
            comm.all_reduce_in_place(&mut device, &nccl_op(op))
                .map(|_| ())
        })?;
        self.download(OP, &device, buf)
    }

    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        const OP: &str = "broadcast";
        self.agree(OP, BROADCAST * 4, buf.len(), root.index(), true)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut device = self.upload(OP, buf)?;
        self.launch(OP, |comm| {
            comm.broadcast_in_place(&mut device, root.index() as i32)
                .map(|_| ())
        })?;
        self.download(OP, &device, buf)
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        const OP: &str = "all_gather";
        self.agree_shard(OP, ALL_GATHER * 4, out.len(), shard.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let block = block_len(out.len(), self.world);
        let mut padded = vec![0.0; block];
        padded[..shard.len()].copy_from_slice(shard);
        let send = self.upload(OP, &padded)?;
        let mut recv = self.upload(OP, &vec![0.0; block * self.world.get()])?;
        self.launch(OP, |comm| comm.all_gather(&send, &mut recv).map(|_| ()))?;
        let mut gathered = vec![0.0; block * self.world.get()];
        self.download(OP, &recv, &mut gathered)?;
        from_blocks(&gathered, self.world, out);
        Ok(())
    }

    fn reduce_scatter(&self, buf: &[f32], shard: &mut [f32], op: ReduceOp) -> Result<()> {
        const OP: &str = "reduce_scatter";
        self.agree_shard(OP, op_code(REDUCE_SCATTER, op), buf.len(), shard.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let block = block_len(buf.len(), self.world);
        let padded = to_blocks(buf, self.world);
        let send = self.upload(OP, &padded)?;
        let mut recv = self.upload(OP, &vec![0.0; block])?;
        self.launch(OP, |comm| {
            comm.reduce_scatter(&send, &mut recv, &nccl_op(op))
                .map(|_| ())
        })?;
        let mut result = vec![0.0; block];
        self.download(OP, &recv, &mut result)?;
        shard.copy_from_slice(&result[..shard.len()]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        // Every call above waits for its GPU work, so the control group's barrier suffices.
        self.control.barrier()
    }

    fn nccl(&self) -> Option<&NcclCollective> {
        Some(self)
    }
}
