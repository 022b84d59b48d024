//! Tensor parallelism: Megatron-style column- and row-parallel Linear layers.
//!
//! A [`ColumnParallelLinear`] holds rank r's share of the output features of a Linear layer
//! (its weight columns and bias entries); a [`RowParallelLinear`] holds its share of the input
//! features (weight rows) and the whole bias. Put one after the other (with an element-wise
//! activation between), they compute the two-layer block of one device with each rank holding
//! `1/N` of both weights, and one all-reduce of the block's output per forward:
//!
//! ```text
//! x (same on every rank) -> column: h_r = act(x W1[:, r] + b1[r]) -> row: y = sum_r h_r W2[r, :] + b2
//! ```
//!
//! The all-reduce is taken out of the autodiff graph and put back as a constant plus
//! `partial - partial.detach()` (exactly zero, gradient one), so the output's gradient reaches
//! every rank's partial product unchanged: Megatron's "all-reduce forward, identity backward".
//! Its mirror, "identity forward, all-reduce backward" on the block's input, is applied to the
//! parameters before the block instead: their gradients are partial on each rank (each saw the
//! input's gradient through its own columns only) and [`sum_gradients`] adds them up. Layers
//! after the block see the same output on every rank and get whole, identical gradients.
//!
//! Feature counts must divide by the number of ranks, as in Megatron.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::collective::{Collective, ReduceOp};
use crate::data_parallel::{
    BucketConfig, BucketLayout, flatten_grads, read_f32, trainable_params, unflatten_grads,
};
use crate::error::{MultiError, Result};
use crate::mesh::{Rank, WorldSize};

/// Rank r's output features of a Linear layer: weight `[d_input, d_output / N]`, bias
/// `[d_output / N]`.
#[derive(Module, Debug)]
pub struct ColumnParallelLinear {
    /// The local part, a Linear layer of its own.
    pub linear: Linear,
}

/// Rank r's input features of a Linear layer: weight `[d_input / N, d_output]`, and the whole
/// bias, added once after the all-reduce.
#[derive(Module, Debug)]
pub struct RowParallelLinear {
    /// The local part: its bias is the full layer's.
    pub linear: Linear,
}

impl ColumnParallelLinear {
    /// Rank `rank`'s columns of `full`.
    ///
    /// # Errors
    /// [`MultiError::Config`] when the output features do not divide by the world size.
    pub fn from_linear(full: &Linear, world: WorldSize, rank: Rank) -> Result<Self> {
        Self::from_linear_grouped(full, 1, world, rank)
    }

    /// Rank `rank`'s share of each of `groups` equal blocks of `full`'s output features, side
    /// by side: Megatron's split of a fused projection, e.g. attention's Q, K and V in one
    /// Linear (`groups` 3), where each rank takes the queries, keys and values of its heads.
    ///
    /// # Errors
    /// [`MultiError::Config`] when the output features do not divide into `groups` blocks
    /// that divide by the world size.
    pub fn from_linear_grouped(
        full: &Linear,
        groups: usize,
        world: WorldSize,
        rank: Rank,
    ) -> Result<Self> {
        let [d_input, d_output] = full.weight.val().dims();
        let block = divide("output features", d_output, groups.max(1))?;
        let part = divide_over("output features per group", block, world)?;
        let columns = |g: usize| {
            let start = g * block + rank.index() * part;
            start..start + part
        };
        let weight = (0..groups)
            .map(|g| full.weight.val().slice([0..d_input, columns(g)]))
            .collect();
        let bias = full.bias.as_ref().map(|b| {
            let parts = (0..groups).map(|g| b.val().slice([columns(g)])).collect();
            Tensor::cat(parts, 0)
        });
        Ok(Self {
            linear: linear_of(Tensor::cat(weight, 1), bias),
        })
    }

    /// The parameters holding this rank's share: the weight's columns and the bias's entries.
    pub fn split_params(&self) -> Vec<burn::module::ParamId> {
        let bias = self.linear.bias.as_ref().map(|b| b.id);
        std::iter::once(self.linear.weight.id).chain(bias).collect()
    }

    /// This rank's output features of `x` (the same `x` on every rank): `[batch, d_output / N]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear.forward(x)
    }

    /// The whole layer, gathered from every rank (all ranks call this together).
    ///
    /// # Errors
    /// When a collective fails.
    pub fn gather(&self, collective: &dyn Collective) -> Result<Linear> {
        self.gather_grouped(1, collective)
    }

    /// The whole layer of a [`from_linear_grouped`](Self::from_linear_grouped) split with
    /// `groups` blocks, gathered from every rank (all ranks call this together).
    ///
    /// # Errors
    /// When a collective fails.
    pub fn gather_grouped(&self, groups: usize, collective: &dyn Collective) -> Result<Linear> {
        // Columns are not contiguous in the [in, out] weight: gather the transpose by rows,
        // then put each group's ranks together.
        let world = collective.world_size().get();
        let weight = gather_rows(self.linear.weight.val().transpose(), collective)?;
        let weight = group_major(weight, groups.max(1), world).transpose();
        let bias = match &self.linear.bias {
            Some(b) => {
                let whole = gather_rows(b.val().unsqueeze_dim::<2>(1), collective)?;
                let whole = group_major(whole, groups.max(1), world);
                let len = whole.dims()[0];
                Some(whole.reshape([len]))
            }
            None => None,
        };
        Ok(linear_of(weight, bias))
    }
}

/// Rows gathered rank by rank (each rank's `groups` blocks in turn) reordered group by group.
fn group_major(rows: Tensor<2>, groups: usize, world: usize) -> Tensor<2> {
    if groups == 1 {
        return rows;
    }
    let [n, cols] = rows.dims();
    let part = n / (groups * world);
    let blocks = (0..groups)
        .flat_map(|g| (0..world).map(move |r| (r * groups + g) * part))
        .map(|start| rows.clone().slice([start..start + part, 0..cols]))
        .collect();
    Tensor::cat(blocks, 0)
}

impl RowParallelLinear {
    /// Rank `rank`'s rows of `full`, with its whole bias.
    ///
    /// # Errors
    /// [`MultiError::Config`] when the input features do not divide by the world size.
    pub fn from_linear(full: &Linear, world: WorldSize, rank: Rank) -> Result<Self> {
        let [d_input, d_output] = full.weight.val().dims();
        let part = divide_over("input features", d_input, world)?;
        let rows = rank.index() * part..(rank.index() + 1) * part;
        let weight = full.weight.val().slice([rows, 0..d_output]);
        let bias = full.bias.as_ref().map(|b| b.val());
        Ok(Self {
            linear: linear_of(weight, bias),
        })
    }

    /// The parameters holding this rank's share: the weight's rows (the bias is whole, the
    /// same on every rank).
    pub fn split_params(&self) -> Vec<burn::module::ParamId> {
        vec![self.linear.weight.id]
    }

    /// The layer's output from this rank's input features `h` (`[batch, d_input / N]`): the
    /// partial products of all ranks summed by an all-reduce, plus the bias; the same on
    /// every rank. Every rank calls it together.
    ///
    /// # Errors
    /// When the all-reduce fails or the partial product cannot be read back.
    pub fn forward(&self, h: Tensor<2>, collective: &dyn Collective) -> Result<Tensor<2>> {
        let partial = h.matmul(self.linear.weight.val());
        let summed = all_reduce_sum(partial.clone().detach(), collective, "row-parallel output")?;
        // Value: the sum, exactly; gradient: straight to this rank's partial product.
        let out = summed + (partial.clone() - partial.detach());
        Ok(match &self.linear.bias {
            Some(bias) => out + bias.val().unsqueeze_dim(0),
            None => out,
        })
    }

    /// The whole layer, gathered from every rank (all ranks call this together).
    ///
    /// # Errors
    /// When a collective fails.
    pub fn gather(&self, collective: &dyn Collective) -> Result<Linear> {
        let weight = gather_rows(self.linear.weight.val(), collective)?;
        Ok(linear_of(
            weight,
            self.linear.bias.as_ref().map(|b| b.val()),
        ))
    }
}

/// Megatron's "f" as an autodiff op: identity forward, the gradient summed over `group` in
/// the backward pass, so that a rank's split layers pass the whole input gradient on to the
/// replicated layers in front, inside one Burn `backward` (a pipeline stage's, say). Burn's
/// backward cannot fail, so a failed all-reduce is kept and returned by
/// [`check`](Self::check) after it. Flex only (Burn has no user-level custom backward; the
/// op is a `kiln-kernels` backend extension).
#[derive(Clone)]
pub struct GradientSum {
    group: std::sync::Arc<dyn Collective>,
    failure: std::sync::Arc<std::sync::Mutex<Option<MultiError>>>,
}

impl std::fmt::Debug for GradientSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradientSum")
            .field("group", &self.group)
            .finish()
    }
}

impl GradientSum {
    /// The op over `group`.
    pub fn new(group: std::sync::Arc<dyn Collective>) -> Self {
        Self {
            group,
            failure: std::sync::Arc::default(),
        }
    }

    /// `x`, whose gradient will be summed over the group.
    ///
    /// # Errors
    /// [`MultiError::Config`] for a tensor that is not `f32` on Flex.
    pub fn apply<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        let (group, failure) = (self.group.clone(), self.failure.clone());
        let reduce = kiln_kernels::GradReduce(std::sync::Arc::new(move |grad: &mut [f32]| {
            if let Err(e) = group.all_reduce(grad, ReduceOp::Sum) {
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            }
        }));
        kiln_kernels::reduce_grad(x, reduce).ok_or_else(|| MultiError::Config {
            field: "tensor parallelism",
            reason: "summing activation gradients inside a backward pass needs f32 tensors on \
                     the CPU (Flex)"
                .into(),
        })
    }

    /// The first all-reduce failure of the backward passes since the last call.
    ///
    /// # Errors
    /// That failure.
    pub fn check(&self) -> Result<()> {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        failure.map_or(Ok(()), Err)
    }
}

/// The sum of `tensor` over the ranks (every rank calls it together), outside any autodiff
/// graph: the forward of a row-parallel layer, and in a hand-run backward Megatron's "f" (the
/// all-reduce of the activation gradient in front of a column-parallel layer). `what` names
/// the tensor in errors.
///
/// # Errors
/// When the all-reduce fails or the tensor cannot be read.
pub fn all_reduce_sum<const D: usize>(
    tensor: Tensor<D>,
    collective: &dyn Collective,
    what: &str,
) -> Result<Tensor<D>> {
    let shape = tensor.shape();
    let device = tensor.device();
    let mut values = read_f32(tensor, || what.to_string())?;
    collective.all_reduce(&mut values, ReduceOp::Sum)?;
    Ok(Tensor::from_data(TensorData::new(values, shape), &device))
}

/// Adds up over the ranks the gradients of `module`'s parameters, which are replicated but
/// feed a tensor-parallel block: each rank's gradient covers only its share of the block.
/// Call it after `backward` with the module holding the layers before the block.
///
/// # Errors
/// When the all-reduce fails or a gradient cannot be read back.
pub fn sum_gradients<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    collective: &dyn Collective,
) -> Result<()> {
    let one_bucket = BucketConfig {
        cap_bytes: usize::MAX,
        first_bucket_bytes: usize::MAX,
    };
    let layout = BucketLayout::plan(&trainable_params(module), one_bucket);
    if layout.buckets.is_empty() {
        return Ok(());
    }
    let mut buffers = vec![vec![0.0; layout.buffer_len(0)]];
    flatten_grads(module, &layout, grads, &mut buffers, true)?;
    collective.all_reduce(&mut buffers[0], ReduceOp::Sum)?;
    unflatten_grads(module, &layout, &buffers, grads);
    Ok(())
}

fn divide_over(what: &'static str, n: usize, world: WorldSize) -> Result<usize> {
    if n.is_multiple_of(world.get()) {
        Ok(n / world.get())
    } else {
        Err(MultiError::Config {
            field: "tensor parallelism",
            reason: format!("{n} {what} do not split evenly over {} ranks", world.get()),
        })
    }
}

fn divide(what: &'static str, n: usize, parts: usize) -> Result<usize> {
    if n.is_multiple_of(parts) {
        Ok(n / parts)
    } else {
        Err(MultiError::Config {
            field: "tensor parallelism",
            reason: format!("{n} {what} do not split into {parts} equal groups"),
        })
    }
}

/// A Linear layer holding `weight` (`[d_input, d_output]`) and `bias` as new trainable
/// parameters.
fn linear_of(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Linear {
    Linear {
        weight: Param::from_tensor(weight.detach().require_grad()),
        bias: bias.map(|b| Param::from_tensor(b.detach().require_grad())),
    }
}

/// Concatenates the ranks' `[rows_r, cols]` blocks (equal `rows_r`) in rank order.
fn gather_rows(local: Tensor<2>, collective: &dyn Collective) -> Result<Tensor<2>> {
    let [rows, cols] = local.dims();
    let device = local.device();
    let values = read_f32(local, || "gathering a tensor-parallel layer".to_string())?;
    let world = collective.world_size().get();
    let mut whole = vec![0.0; values.len() * world];
    collective.all_gather(&values, &mut whole)?;
    Ok(Tensor::from_data(
        TensorData::new(whole, [rows * world, cols]),
        &device,
    ))
}
