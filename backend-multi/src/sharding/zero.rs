//! ZeRO stages 1 and 2 over any [`Collective`].

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;

use super::flat::FlatOptimizer;
use crate::collective::{Collective, ReduceOp, all_reduce_sum_f64, shard_range};
use crate::data_parallel::{
    BucketConfig, BucketLayout, broadcast_module, ensure_all_placed, flatten_grads,
    flatten_params_into, load_params_from, trainable_params,
};
use crate::error::{MultiError, Result};
use crate::mesh::Rank;

/// Which parts of the training state are split over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// The optimizer state: gradients are all-reduced, each rank updates its shard.
    One,
    /// The optimizer state and the synchronised gradients: gradients are reduce-scattered, so
    /// each rank keeps only the gradient of its shard.
    Two,
}

impl ZeroStage {
    /// 1 or 2.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
        }
    }
}

/// Settings of a [`ZeroOptimizer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroConfig {
    /// ZeRO stage.
    pub stage: ZeroStage,
    /// The optimizer each rank runs on its shard.
    pub optimizer: FlatOptimizer,
}

/// Bytes one rank keeps for training state between steps, next to what plain data
/// parallelism keeps (every rank holding everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMemory {
    /// Trainable parameter elements of the model (replicated on every rank by ZeRO 1 and 2).
    pub parameter_elements: usize,
    /// Elements of this rank's shard.
    pub shard_elements: usize,
    /// Optimizer state kept by this rank.
    pub optimizer_state_bytes: usize,
    /// Synchronised gradient kept by this rank until the step (the whole gradient for stage 1,
    /// the shard's for stage 2).
    pub gradient_bytes: usize,
    /// Optimizer state each rank keeps without sharding.
    pub unsharded_optimizer_state_bytes: usize,
    /// Synchronised gradient each rank keeps without sharding.
    pub unsharded_gradient_bytes: usize,
}

/// One parameter's optimizer state, whole (gathered from the shards), in the model's terms
/// rather than the flat layout's: what [`ZeroOptimizer::gather_state`] returns and
/// [`ZeroOptimizer::load_state`] takes, so that a checkpoint can hold it in any format.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    /// The parameter.
    pub id: ParamId,
    /// Optimizer steps it has taken (Adam's bias correction), at least 1: a parameter that
    /// never had a gradient has no state.
    pub steps: u32,
    /// The velocity (SGD momentum) or the first moment (Adam), one value per element.
    pub first: Vec<f32>,
    /// The second moment (Adam), one value per element; empty for SGD.
    pub second: Vec<f32>,
}

/// One trainable parameter's place in the flat buffers.
#[derive(Debug, Clone)]
struct Slot {
    id: ParamId,
    offset: usize,
    len: usize,
    /// Index of its "had a gradient" flag after the gradients.
    flag: usize,
}

/// An optimizer whose state is split over the ranks of a group (ZeRO stage 1 or 2), for any
/// Burn [`Module`]; PyTorch's `ZeroRedundancyOptimizer`, DeepSpeed's ZeRO-1/2.
///
/// The trainable parameters are laid out flat (in reverse registration order, as the
/// gradient buckets of [`DistributedDataParallel`](crate::DistributedDataParallel)) and split
/// into contiguous shards by [`shard_range`]. Each [`step`](Self::step) synchronises the
/// gradients (all-reduce for stage 1, reduce-scatter for stage 2, averaged), updates this
/// rank's shard of the parameters with its shard of the optimizer state, and all-gathers the
/// updated parameters into every replica. The result is the step of one device with the same
/// optimizer on the whole batch.
pub struct ZeroOptimizer {
    collective: Arc<dyn Collective>,
    config: ZeroConfig,
    layout: BucketLayout,
    slots: Vec<Slot>,
    total: usize,
    shard: Range<usize>,
    /// Per slot: steps taken (Adam's bias correction); 0 until the parameter has had a
    /// gradient (its state exists from then on).
    time: Vec<i32>,
    /// This rank's optimizer state: velocity or first moment, and second moment (Adam).
    state: (Vec<f32>, Vec<f32>),
    /// The synchronised gradient kept until the step: whole (stage 1) or the shard (stage 2).
    grads: Vec<f32>,
    /// With tensor parallelism: the group the model is split over, and per slot whether the
    /// parameter is split over it (its gradient's squares are summed over that group for the
    /// clipping norm; the replicated ones count once).
    split_norm: Option<(Arc<dyn Collective>, Vec<bool>)>,
}

impl ZeroOptimizer {
    /// Makes `model` this rank's replica (rank 0's parameters, as
    /// [`DistributedDataParallel::new`](crate::DistributedDataParallel::new) does) and plans
    /// the shards. Every rank calls it with a model of the same structure.
    ///
    /// # Errors
    /// When the broadcast fails or the models differ in size.
    pub fn new<M: Module>(
        model: M,
        collective: Arc<dyn Collective>,
        config: ZeroConfig,
    ) -> Result<(M, Self)> {
        let model = broadcast_module(model, collective.as_ref(), Rank::ZERO)?;
        let one_bucket = BucketConfig {
            cap_bytes: usize::MAX,
            first_bucket_bytes: usize::MAX,
        };
        let layout = BucketLayout::plan(&trainable_params(&model), one_bucket);
        let (slots, total) = match layout.buckets.first() {
            None => (Vec::new(), 0),
            Some(bucket) => {
                let slots = bucket
                    .params()
                    .iter()
                    .map(|id| {
                        let place = layout.placements[id];
                        Slot {
                            id: *id,
                            offset: place.offset,
                            len: place.elements,
                            flag: place.flag,
                        }
                    })
                    .collect();
                (slots, bucket.elements())
            }
        };
        let shard = shard_range(total, collective.world_size(), collective.rank());
        let per = config.optimizer.state_per_element();
        let state = (
            vec![0.0; shard.len()],
            vec![0.0; if per > 1 { shard.len() } else { 0 }],
        );
        let grads = vec![
            0.0;
            match config.stage {
                ZeroStage::One => total,
                ZeroStage::Two => shard.len(),
            }
        ];
        let zero = Self {
            time: vec![0; slots.len()],
            collective,
            config,
            layout,
            slots,
            total,
            shard,
            state,
            grads,
            split_norm: None,
        };
        Ok((model, zero))
    }

    /// Makes the clipping norm the whole model's when this rank's model is one part of a
    /// tensor-parallel split over `group`: the parameters in `split` are split over it (their
    /// squares are summed over the group), the others replicated on every part (counted once).
    /// Every rank of the mesh sets it, or none.
    pub fn set_split_norm(&mut self, group: Arc<dyn Collective>, split: &HashSet<ParamId>) {
        let split = self.slots.iter().map(|s| split.contains(&s.id)).collect();
        self.split_norm = Some((group, split));
    }

    /// The collective the shards are exchanged through.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// The configuration in use.
    pub fn config(&self) -> ZeroConfig {
        self.config
    }

    /// This rank's part of the flat parameters.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// What this rank keeps, next to plain data parallelism.
    pub fn memory(&self) -> ShardMemory {
        let per = self.config.optimizer.state_per_element();
        let f32s = std::mem::size_of::<f32>();
        ShardMemory {
            parameter_elements: self.total,
            shard_elements: self.shard.len(),
            optimizer_state_bytes: (self.state.0.len() + self.state.1.len()) * f32s,
            gradient_bytes: self.grads.len() * f32s,
            unsharded_optimizer_state_bytes: self.total * per * f32s,
            unsharded_gradient_bytes: self.total * f32s,
        }
    }

    /// One optimizer step with learning rate `lr` on this rank's gradients `grads` (each rank
    /// its own samples; they are averaged): returns the updated replica, identical on every
    /// rank. A parameter no rank has a gradient for is left unchanged, as Burn's optimizers do.
    ///
    /// # Errors
    /// When a collective fails, a gradient cannot be read, or a gradient belongs to a
    /// parameter that was not trainable when [`new`](Self::new) planned the shards.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: GradientsParams) -> Result<M> {
        Ok(self.step_clipped(lr, model, grads, None)?.0)
    }

    /// [`step`](Self::step), with the averaged gradient first clipped to a global L2 norm of
    /// at most `max_norm` (PyTorch's `clip_grad_norm_`: scaled by `max_norm / (norm + 1e-6)`
    /// when that is below 1). The norm is taken across the shards (each rank's part, summed
    /// over the group), so the update is the one device's. Returns the replica and, when
    /// clipping, the norm before clipping.
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_clipped<M: Module>(
        &mut self,
        lr: f64,
        model: M,
        grads: GradientsParams,
        max_norm: Option<f64>,
    ) -> Result<(M, Option<f64>)> {
        let flags = self.synchronise(&model, grads)?;
        let (scale, norm) = match max_norm {
            Some(max_norm) => {
                let norm = self.global_norm()?;
                (clip_coefficient(norm, max_norm), Some(norm))
            }
            None => (None, None),
        };
        let mut params = vec![0.0; self.total];
        flatten_params_into(&model, &self.layout, &mut params)?;
        self.update_shard(lr, &mut params, &flags, scale);
        if self.collective.world_size().get() > 1 {
            let updated = params[self.shard.clone()].to_vec();
            self.collective.all_gather(&updated, &mut params)?;
        }
        Ok((load_params_from(model, &self.layout, &params), norm))
    }

    /// The L2 norm of the synchronised gradient: each rank's shard of the squares, summed over
    /// the group, and with a tensor-parallel split the split parameters' sums over its group.
    fn global_norm(&self) -> Result<f64> {
        let shard_grads = Self::shard_grads(self.config.stage, &self.grads, &self.shard);
        // [split over a tensor-parallel group, replicated]
        let mut squares = [0.0f64; 2];
        for (k, slot) in self.slots.iter().enumerate() {
            let lo = slot.offset.max(self.shard.start);
            let hi = (slot.offset + slot.len).min(self.shard.end);
            if lo >= hi {
                continue;
            }
            let split = self.split_norm.as_ref().is_some_and(|(_, split)| split[k]);
            let part = &shard_grads[lo - self.shard.start..hi - self.shard.start];
            squares[usize::from(!split)] += part
                .iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>();
        }
        all_reduce_sum_f64(self.collective.as_ref(), &mut squares)?;
        if let Some((group, _)) = &self.split_norm {
            all_reduce_sum_f64(group.as_ref(), &mut squares[..1])?;
        }
        Ok((squares[0] + squares[1]).sqrt())
    }

    /// Averages the ranks' gradients into `self.grads` (whole or this rank's shard) and
    /// returns the per-parameter "some rank had a gradient" flags.
    fn synchronise<M: Module>(
        &mut self,
        model: &M,
        mut grads: GradientsParams,
    ) -> Result<Vec<f32>> {
        let world = self.collective.world_size().get();
        let mut buffer = vec![0.0; self.total + self.slots.len()];
        flatten_grads(
            model,
            &self.layout,
            &mut grads,
            std::slice::from_mut(&mut buffer),
            true,
        )?;
        ensure_all_placed(&grads, "sharded optimizer step", "ZeroOptimizer::new")?;
        // The gradients, then one "had a gradient" flag per parameter.
        let mut flags = buffer.split_off(self.total);
        if world > 1 {
            self.collective.all_reduce(&mut flags, ReduceOp::Max)?;
        }
        match self.config.stage {
            ZeroStage::One => {
                if world > 1 {
                    self.collective.all_reduce(&mut buffer, ReduceOp::Avg)?;
                }
                self.grads = buffer;
            }
            ZeroStage::Two => {
                self.collective
                    .reduce_scatter(&buffer, &mut self.grads, ReduceOp::Avg)?;
            }
        }
        Ok(flags)
    }

    /// The synchronised gradient of this rank's shard, out of `grads` as `stage` keeps it
    /// (whole for stage 1, the shard alone for stage 2). Over fields, not `&self`, so the
    /// optimizer state can be borrowed beside it.
    fn shard_grads<'a>(stage: ZeroStage, grads: &'a [f32], shard: &Range<usize>) -> &'a [f32] {
        match stage {
            ZeroStage::One => &grads[shard.clone()],
            ZeroStage::Two => grads,
        }
    }

    /// Runs the optimizer on this rank's shard of `params`, for every parameter some rank had
    /// a gradient for.
    fn update_shard(&mut self, lr: f64, params: &mut [f32], flags: &[f32], scale: Option<f32>) {
        let shard_grads = Self::shard_grads(self.config.stage, &self.grads, &self.shard);
        let start = self.shard.start;
        for (k, slot) in self.slots.iter().enumerate() {
            if flags[slot.flag - self.total] == 0.0 {
                continue;
            }
            let time = self.time[k] + 1;
            let first = time == 1;
            self.time[k] = time;
            let lo = slot.offset.max(self.shard.start);
            let hi = (slot.offset + slot.len).min(self.shard.end);
            if lo >= hi {
                continue;
            }
            let local = lo - start..hi - start;
            let second: &mut [f32] = if self.state.1.is_empty() {
                &mut []
            } else {
                &mut self.state.1[local.clone()]
            };
            self.config.optimizer.step(
                lr,
                &mut params[lo..hi],
                &shard_grads[local.clone()],
                (&mut self.state.0[local], second),
                first,
                time,
                scale,
            );
        }
    }

    /// The whole flat optimizer state (first and, for Adam, second values), gathered from
    /// every rank.
    fn gather_flat_state(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let gather = |part: &[f32]| -> Result<Vec<f32>> {
            let mut whole = vec![0.0; self.total];
            if self.collective.world_size().get() > 1 {
                self.collective.all_gather(part, &mut whole)?;
            } else {
                whole.copy_from_slice(part);
            }
            Ok(whole)
        };
        let first = gather(&self.state.0)?;
        let second = match self.state.1.is_empty() {
            true => Vec::new(),
            false => gather(&self.state.1)?,
        };
        Ok((first, second))
    }

    /// The whole optimizer state, gathered from every rank (all ranks call this together),
    /// per parameter that has state: what a checkpoint in any format is written from.
    ///
    /// # Errors
    /// When a collective fails.
    pub fn gather_state(&self) -> Result<Vec<ParamState>> {
        let (first, second) = self.gather_flat_state()?;
        let range = |values: &[f32], slot: &Slot| match values.is_empty() {
            true => Vec::new(),
            false => values[slot.offset..slot.offset + slot.len].to_vec(),
        };
        Ok(self
            .slots
            .iter()
            .zip(&self.time)
            .filter(|&(_, &time)| time > 0)
            .map(|(slot, &time)| ParamState {
                id: slot.id,
                steps: time.unsigned_abs(),
                first: range(&first, slot),
                second: range(&second, slot),
            })
            .collect())
    }

    /// Restores the state of [`gather_state`](Self::gather_state) (of this model, written on
    /// any number of ranks): each rank keeps its shard; parameters not listed start afresh.
    ///
    /// # Errors
    /// [`MultiError::Tensor`] when a state names a parameter this optimizer does not train,
    /// or has the wrong number of values for it or for this optimizer.
    pub fn load_state(&mut self, states: &[ParamState]) -> Result<()> {
        let bad = |detail: String| MultiError::Tensor {
            context: "loading optimizer state into ZeRO shards".to_string(),
            detail,
        };
        let index: HashMap<ParamId, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(k, s)| (s.id, k))
            .collect();
        let per = self.config.optimizer.state_per_element();
        let (mut first, mut second) = (vec![0.0; self.total], vec![0.0; self.total]);
        let mut time = vec![0; self.slots.len()];
        for state in states {
            let Some(&k) = index.get(&state.id) else {
                return Err(bad(format!("parameter {} is not trained here", state.id)));
            };
            let slot = &self.slots[k];
            let want_second = if per > 1 { slot.len } else { 0 };
            if state.first.len() != slot.len || state.second.len() != want_second {
                return Err(bad(format!(
                    "parameter {} has {} + {} state values, {} needs {} + {want_second}",
                    state.id,
                    state.first.len(),
                    state.second.len(),
                    self.config.optimizer.name(),
                    slot.len
                )));
            }
            let range = slot.offset..slot.offset + slot.len;
            first[range.clone()].copy_from_slice(&state.first);
            second[range][..want_second].copy_from_slice(&state.second);
            time[k] = i32::try_from(state.steps).map_err(|_| bad("step count".to_string()))?;
        }
        self.state.0 = first[self.shard.clone()].to_vec();
        if per > 1 {
            self.state.1 = second[self.shard.clone()].to_vec();
        }
        self.time = time;
        Ok(())
    }

    /// The whole optimizer state, gathered from every rank (all ranks must call this
    /// together), as bytes for a checkpoint. It does not depend on the world size, so a run
    /// can resume on another number of ranks.
    ///
    /// # Errors
    /// When a collective fails.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let (first, second) = self.gather_flat_state()?;
        let mut out = Vec::with_capacity(64 + 4 * (first.len() + second.len()));
        out.extend_from_slice(ZERO_STATE_MAGIC);
        let name = self.config.optimizer.name().as_bytes();
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(self.slots.len() as u64).to_le_bytes());
        for (k, slot) in self.slots.iter().enumerate() {
            out.extend_from_slice(&(slot.len as u64).to_le_bytes());
            // Whether the parameter has state (the format keeps the flag beside the count).
            out.push(u8::from(self.time[k] > 0));
            out.extend_from_slice(&self.time[k].to_le_bytes());
        }
        for v in first.iter().chain(&second) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    /// Restores the state written by [`state_bytes`](Self::state_bytes), on any number of
    /// ranks: each rank keeps its own shard.
    ///
    /// # Errors
    /// [`MultiError::Tensor`] when the bytes are not such a state, or belong to another
    /// optimizer or a model of another layout.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = |detail: String| MultiError::Tensor {
            context: "loading sharded optimizer state".to_string(),
            detail,
        };
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(ZERO_STATE_MAGIC.len()).ok() != Some(ZERO_STATE_MAGIC) {
            return Err(bad("not a kiln ZeRO optimizer state".to_string()));
        }
        let truncated = |_| bad("truncated".to_string());
        let name_len = reader.u64().map_err(truncated)? as usize;
        let name = reader.take(name_len).map_err(truncated)?;
        if name != self.config.optimizer.name().as_bytes() {
            return Err(bad(format!(
                "it is {} state, this run uses {}",
                String::from_utf8_lossy(name),
                self.config.optimizer.name()
            )));
        }
        let slots = reader.u64().map_err(truncated)? as usize;
        if slots != self.slots.len() {
            return Err(bad(format!(
                "it has {slots} parameters, the model {}",
                self.slots.len()
            )));
        }
        let mut time = Vec::new();
        for slot in &self.slots {
            let len = reader.u64().map_err(truncated)? as usize;
            if len != slot.len {
                return Err(bad(format!(
                    "a parameter has {len} elements, the model's has {}",
                    slot.len
                )));
            }
            // The "has state" flag: the step count says the same.
            reader.take(1).map_err(truncated)?;
            time.push(i32::from_le_bytes(
                reader
                    .take(4)
                    .map_err(truncated)?
                    .try_into()
                    .expect("4 bytes"),
            ));
        }
        let per = self.config.optimizer.state_per_element();
        let values = reader.take(self.total * per * 4).map_err(truncated)?;
        if reader.at != bytes.len() {
            return Err(bad("trailing bytes".to_string()));
        }
        let value = |i: usize| f32::from_le_bytes(values[4 * i..4 * i + 4].try_into().expect("4"));
        let shard = self.shard.clone();
        self.state.0 = shard.clone().map(value).collect();
        if per > 1 {
            self.state.1 = shard.map(|i| value(self.total + i)).collect();
        }
        self.time = time;
        Ok(())
    }
}

/// The factor by which PyTorch's `clip_grad_norm_` scales gradients of global L2 norm `norm`
/// so that it is at most `max_norm`: `max_norm / (norm + 1e-6)`, in `f32`, when that is
/// below 1; `None` when nothing is clipped. ZeRO and the trainer's replicated step both use
/// it, so they take the same step.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f32> {
    let coefficient = max_norm / (norm + 1e-6);
    (coefficient < 1.0).then_some(coefficient as f32)
}

/// The first bytes of [`ZeroOptimizer::state_bytes`], by which a checkpoint's optimizer state is
/// known to be sharded.
pub const ZERO_STATE_MAGIC: &[u8] = b"KILNZERO1";

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], ()> {
        let end = self.at.checked_add(n).ok_or(())?;
        let out = self.bytes.get(self.at..end).ok_or(())?;
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> std::result::Result<u64, ()> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}
