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
        let [d_input, d_output] = full.weight.val().dims();
        let part = divide("output features", d_output, world)?;
        let columns = rank.index() * part..(rank.index() + 1) * part;
        let weight = full.weight.val().slice([0..d_input, columns.clone()]);
        let bias = full.bias.as_ref().map(|b| b.val().slice([columns]));
        Ok(Self {
            linear: linear_of(weight, bias),
        })
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
        // Columns are not contiguous in the [in, out] weight: gather the transpose by rows.
        let weight = gather_rows(self.linear.weight.val().transpose(), collective)?.transpose();
        let bias = match &self.linear.bias {
            Some(b) => {
                let whole = gather_rows(b.val().unsqueeze_dim::<2>(1), collective)?;
                let len = whole.dims()[0];
                Some(whole.reshape([len]))
            }
            None => None,
        };
        Ok(linear_of(weight, bias))
    }
}

impl RowParallelLinear {
    /// Rank `rank`'s rows of `full`, with its whole bias.
    ///
    /// # Errors
    /// [`MultiError::Config`] when the input features do not divide by the world size.
    pub fn from_linear(full: &Linear, world: WorldSize, rank: Rank) -> Result<Self> {
        let [d_input, d_output] = full.weight.val().dims();
        let part = divide("input features", d_input, world)?;
        let rows = rank.index() * part..(rank.index() + 1) * part;
        let weight = full.weight.val().slice([rows, 0..d_output]);
        let bias = full.bias.as_ref().map(|b| b.val());
        Ok(Self {
            linear: linear_of(weight, bias),
        })
    }

    /// The layer's output from this rank's input features `h` (`[batch, d_input / N]`): the
    /// partial products of all ranks summed by an all-reduce, plus the bias; the same on
    /// every rank. Every rank calls it together.
    ///
    /// # Errors
    /// When the all-reduce fails or the partial product cannot be read back.
    pub fn forward(&self, h: Tensor<2>, collective: &dyn Collective) -> Result<Tensor<2>> {
        let partial = h.matmul(self.linear.weight.val());
        let shape = partial.shape();
        let device = partial.device();
        let mut values = read_f32(partial.clone(), || "row-parallel Linear output".to_string())?;
        collective.all_reduce(&mut values, ReduceOp::Sum)?;
        let summed = Tensor::<2>::from_data(TensorData::new(values, shape), &device);
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

fn divide(what: &'static str, n: usize, world: WorldSize) -> Result<usize> {
    if n.is_multiple_of(world.get()) {
        Ok(n / world.get())
    } else {
        Err(MultiError::Config {
            field: "tensor parallelism",
            reason: format!("{n} {what} do not split evenly over {} ranks", world.get()),
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
