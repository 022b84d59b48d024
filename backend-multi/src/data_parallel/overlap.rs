//! Gradient all-reduce overlapped with backward, as PyTorch's DDP reducer does it.
//!
//! Burn 0.22's own hook for this (`DistributedOps::submit_gradient_sync`) is not implemented
//! by Flex (its `all_reduce` panics as not implemented), so kiln makes its own: before the
//! forward pass every trainable parameter of the replica is passed through
//! `kiln_kernels::reduce_grad_at`, an identity whose backward hands the parameter's finished
//! gradient to a callback. Burn's backward runs steps deepest first, so each hook is given a
//! depth just under its consumer's ([`CLOCK_STRIDE`]); on the parameter alone (depth 1) it
//! would run after the whole backward pass. The callback copies the gradient into its bucket;
//! a bucket whose gradients have all arrived is all-reduced by a communication thread while
//! backward goes on with the earlier layers. Buckets are reduced in layout order on every rank, so the ranks' calls
//! match whatever order backward ran in; buffers, flags and reductions are those of the
//! after-backward path, so both give the same bits.

use std::mem;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use kiln_kernels::GradReduce;

use super::bucket::{BucketLayout, Placement};
use crate::collective::{Collective, ReduceOp};
use crate::error::{MultiError, Result};

/// What the callbacks and the communication thread share during one backward pass.
struct State {
    /// Each bucket's buffer (taken out while its all-reduce runs).
    buffers: Vec<Vec<f32>>,
    /// Parameters of each bucket whose gradients have not arrived yet.
    missing: Vec<usize>,
    /// Backward is over: buckets still missing gradients go as they are (zeros, flag 0).
    closed: bool,
    /// A gradient of the wrong size (kept for `finish`).
    error: Option<MultiError>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One step's overlapped synchronisation, from [`start`] to [`Inflight::finish`].
pub(crate) struct Inflight {
    shared: Arc<Shared>,
    comm: Option<JoinHandle<Result<Vec<Vec<f32>>>>>,
}

/// Starts a step: returns `model` with every parameter of `layout` wrapped in its gradient
/// hook, and the synchronisation in flight; `None` where the hook op is missing (not Flex,
/// not `f32`), and the caller synchronises after backward instead.
pub(crate) fn start<M: Module>(
    model: &M,
    layout: &BucketLayout,
    buffers: Vec<Vec<f32>>,
    collective: Arc<dyn Collective>,
) -> std::result::Result<(M, Inflight), Vec<Vec<f32>>> {
    let missing = layout.buckets.iter().map(|b| b.params().len()).collect();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buffers,
            missing,
            closed: false,
            error: None,
        }),
        ready: Condvar::new(),
    });
    let mut hook = Hook {
        layout,
        shared: &shared,
        missing_op: false,
        clocks: Vec::new(),
        next: 0,
    };
    let hooked = model.clone().map(&mut hook);
    if hook.missing_op {
        let buffers = mem::take(&mut shared.lock().buffers);
        return Err(buffers);
    }
    let thread_shared = Arc::clone(&shared);
    let comm = std::thread::Builder::new()
        .name("kiln-ddp-overlap".into())
        .spawn(move || reduce_in_order(&thread_shared, collective.as_ref()))
        .expect("spawning the gradient-sync thread");
    Ok((
        hooked,
        Inflight {
            shared,
            comm: Some(comm),
        },
    ))
}

impl Inflight {
    /// Waits for every bucket's all-reduce (buckets without all their gradients go as they
    /// are) and returns the averaged buffers.
    ///
    /// # Errors
    /// A failed all-reduce, or a gradient whose size was not its parameter's.
    pub(crate) fn finish(mut self) -> Result<Vec<Vec<f32>>> {
        self.close();
        let buffers = self
            .comm
            .take()
            .expect("finish runs once")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        match self.shared.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(buffers),
        }
    }

    fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

impl Drop for Inflight {
    /// A step that failed before `finish`: the thread is released (its all-reduces end by
    /// the collective's timeout if the other ranks do not come) and joined.
    fn drop(&mut self) {
        if let Some(comm) = self.comm.take() {
            self.close();
            let _ = comm.join();
        }
    }
}

/// The communication thread: all-reduces the buckets in layout order, each once complete.
fn reduce_in_order(shared: &Shared, collective: &dyn Collective) -> Result<Vec<Vec<f32>>> {
    let buckets = shared.lock().buffers.len();
    let mut done = Vec::with_capacity(buckets);
    for b in 0..buckets {
        let mut buffer = {
            let mut state = shared.lock();
            while state.missing[b] > 0 && !state.closed {
                state = shared
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            mem::take(&mut state.buffers[b])
        };
        collective.all_reduce(&mut buffer, ReduceOp::Avg)?;
        done.push(buffer);
    }
    Ok(done)
}

/// Wraps each planned parameter in `reduce_grad` with a callback that files its gradient.
struct Hook<'a> {
    layout: &'a BucketLayout,
    shared: &'a Arc<Shared>,
    missing_op: bool,
    /// One clock per planned parameter, in registration order (made on the first one's
    /// device), and the next one's index.
    clocks: Vec<Tensor<1>>,
    next: usize,
}

/// Autodiff depth given to the `k`-th planned parameter's hook: `CLOCK_STRIDE * (k + 1)`.
/// Burn's backward runs steps deepest first, so a hook at depth 1 (on the parameter itself)
/// would run after the whole backward pass. Parameters are registered roughly in the order
/// the forward pass uses them, and a stride above the operations between two parameters'
/// uses puts each hook just below its consumer: the gradient is filed as soon as it is
/// complete. A hook deeper than its consumer's other inputs only pushes the consumer (and
/// what follows it) deeper, which keeps every step after the steps it depends on.
const CLOCK_STRIDE: usize = 6;

impl ModuleMapper for Hook<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(place) = self.layout.placements.get(&param.id).copied() else {
            return param;
        };
        if self.clocks.is_empty() {
            let depths: Vec<usize> = (1..=self.layout.placements.len())
                .map(|k| k * CLOCK_STRIDE)
                .collect();
            self.clocks = kiln_kernels::backward_clocks(&depths, &param.lazy_device());
        }
        let clock = self.clocks.get(self.next).cloned();
        self.next += 1;
        let shared = Arc::clone(self.shared);
        let id = param.id;
        let file = GradReduce(Arc::new(move |grad: &mut [f32]| {
            file_gradient(&shared, place, grad, id)
        }));
        let mut missing = false;
        let param = param.map(|tensor| {
            let hooked = match &clock {
                Some(clock) => kiln_kernels::reduce_grad_at(tensor.clone(), clock, file),
                None => kiln_kernels::reduce_grad(tensor.clone(), file),
            };
            hooked.unwrap_or_else(|| {
                missing = true;
                tensor
            })
        });
        self.missing_op |= missing;
        param
    }
}

/// Copies one parameter's gradient into its bucket and wakes the communication thread when
/// that completes the bucket. Runs inside Burn's backward, so it cannot fail: a size error
/// is kept for [`Inflight::finish`].
fn file_gradient(shared: &Shared, place: Placement, grad: &[f32], id: burn::module::ParamId) {
    let mut state = shared.lock();
    if grad.len() != place.elements {
        state.error.get_or_insert(MultiError::Tensor {
            context: format!("gradient of parameter {id}"),
            detail: format!(
                "has {} elements, the parameter {}",
                grad.len(),
                place.elements
            ),
        });
    } else if let Some(buffer) = state
        .buffers
        .get_mut(place.bucket)
        .filter(|buffer| buffer.len() > place.flag)
    {
        buffer[place.offset..place.offset + place.elements].copy_from_slice(grad);
        buffer[place.flag] = 1.0;
    }
    state.missing[place.bucket] = state.missing[place.bucket].saturating_sub(1);
    if state.missing[place.bucket] == 0 {
        shared.ready.notify_all();
    }
}
