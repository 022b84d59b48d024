//! Megatron-style tensor parallelism of the GPT's blocks.
//!
//! Each rank holds, per block, its heads' queries, keys and values (`c_attn` split by
//! columns in three groups), the matching rows of the attention's output projection, its
//! columns of the MLP's `c_fc` and the matching rows of its `c_proj`; LayerNorms, embeddings and
//! the LM head are replicated (the vocabulary is 256 bytes: a vocabulary-parallel head would
//! split 4 % of the parameters and add two collectives per step). Each sub-block's forward
//! all-reduces its row-parallel output once ("g").
//!
//! Its backward needs Megatron's "f": the gradient of a sub-block's input reaches each rank only
//! through its own heads or columns, and must be summed over the ranks before it flows on into
//! the residual stream below. Burn's autodiff runs one backward over a whole graph with no hook
//! in between, so [`TensorParallelGpt::train_step`] cuts the graph at every sub-block: the
//! forward runs each branch on a detached copy of the residual stream, the backward walks the
//! sub-blocks from the top, each with its own `backward` seeded with the stream's gradient,
//! and all-reduces the gradient of the branch's input before adding it to the stream's. The
//! LayerNorms in front of the split layers get partial gradients the same way; the split's
//! `sync_gradients` sums them.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor};
use kiln_models::gpt::{Block, Gpt, Mlp, Transformer, norm};
use kiln_multi::tensor_parallel::{
    ColumnParallelLinear, GradientSum, RowParallelLinear, all_reduce_sum, sum_gradients,
};
use kiln_multi::{Collective, MultiError};
use kiln_trainer::data::TokenBatch;
use kiln_trainer::{GradStep, StepOutput, StepResult};

/// Rank r's part of a [`Gpt`] in a tensor-parallel group; built by
/// [`split`](Self::split), turned back into the whole model by [`gather`](Self::gather).
#[derive(Module, Debug)]
pub struct TensorParallelGpt {
    /// Token embedding, replicated.
    pub wte: Embedding,
    /// Position embedding, replicated.
    pub wpe: Embedding,
    /// The blocks, split.
    pub h: Vec<TensorParallelBlock>,
    /// Final LayerNorm, replicated.
    pub ln_f: LayerNorm,
    /// The untied head, replicated.
    pub lm_head: Option<Linear>,
    /// The group of the forward's all-reduces.
    #[module(skip)]
    group: Arc<dyn Collective>,
    /// The group the backward's activation gradients are summed over (the same group; a
    /// test replaces it to show that the sum is needed).
    #[module(skip)]
    gradient_group: Arc<dyn Collective>,
    /// One group of the same ranks per pipeline stage ([`split_pipelined`](Self::split_pipelined));
    /// empty without a pipeline.
    #[module(skip)]
    stage_groups: Vec<Arc<dyn Collective>>,
    /// Megatron's "f" over each stage's group, whose failures outlive the stages.
    #[module(skip)]
    stage_sums: Vec<GradientSum>,
}

/// Rank r's part of a [`Block`].
#[derive(Module, Debug)]
pub struct TensorParallelBlock {
    /// Replicated.
    pub ln_1: LayerNorm,
    /// This rank's heads' Q, K and V columns.
    pub c_attn: ColumnParallelLinear,
    /// The rows of the attention's output projection for this rank's heads.
    pub attn_proj: RowParallelLinear,
    /// Replicated.
    pub ln_2: LayerNorm,
    /// This rank's columns of the MLP's first layer.
    pub c_fc: ColumnParallelLinear,
    /// The matching rows of the MLP's second layer.
    pub mlp_proj: RowParallelLinear,
    /// Heads on this rank.
    pub heads: usize,
}

/// A sub-block: the attention or the MLP branch of a block.
#[derive(Debug, Clone, Copy)]
pub(super) enum Branch {
    Attention,
    Mlp,
}

impl TensorParallelGpt {
    /// This rank's part of `model` in `group`, its parameters leaves of their own
    /// ([`own_leaves`](kiln_multi::pipeline::own_leaves): ranks split from one model in
    /// threads would otherwise share the replicated parameters' autodiff nodes, and Burn's
    /// graph locks deadlock when they train at the same time).
    ///
    /// # Errors
    /// [`MultiError::Config`] when the heads or the MLP's width do not divide by the group's
    /// size.
    pub fn split(model: &Gpt, group: Arc<dyn Collective>) -> kiln_multi::Result<Self> {
        let (world, rank) = (group.world_size(), group.rank());
        let heads = model.config().heads;
        if !heads.is_multiple_of(world.get()) {
            return Err(MultiError::Config {
                field: "tensor parallelism",
                reason: format!(
                    "{heads} heads do not split evenly over {} ranks",
                    world.get()
                ),
            });
        }
        let block = |b: &Block| -> kiln_multi::Result<TensorParallelBlock> {
            Ok(TensorParallelBlock {
                ln_1: b.ln_1.clone(),
                c_attn: ColumnParallelLinear::from_linear_grouped(&b.attn.c_attn, 3, world, rank)?,
                attn_proj: RowParallelLinear::from_linear(&b.attn.c_proj, world, rank)?,
                ln_2: b.ln_2.clone(),
                c_fc: ColumnParallelLinear::from_linear(&b.mlp.c_fc, world, rank)?,
                mlp_proj: RowParallelLinear::from_linear(&b.mlp.c_proj, world, rank)?,
                heads: heads / world.get(),
            })
        };
        let t = &model.transformer;
        Ok(kiln_multi::pipeline::own_leaves(Self {
            wte: t.wte.clone(),
            wpe: t.wpe.clone(),
            h: t.h.iter().map(block).collect::<kiln_multi::Result<_>>()?,
            ln_f: t.ln_f.clone(),
            lm_head: model.lm_head.clone(),
            gradient_group: Arc::clone(&group),
            group,
            stage_groups: Vec::new(),
            stage_sums: Vec::new(),
        }))
    }

    /// [`split`](Self::split) for a pipeline of `stages` stages: with one duplicate of `group`
    /// per stage (each stage's thread runs its collectives at the same time as the others').
    /// Every rank calls it together.
    ///
    /// # Errors
    /// As [`split`](Self::split), and when the group cannot be duplicated.
    pub fn split_pipelined(
        model: &Gpt,
        group: Arc<dyn Collective>,
        stages: usize,
    ) -> kiln_multi::Result<Self> {
        let mut part = Self::split(model, Arc::clone(&group))?;
        part.stage_groups = (0..stages)
            .map(|_| group.duplicate())
            .collect::<kiln_multi::Result<_>>()?;
        part.stage_sums = part
            .stage_groups
            .iter()
            .map(|g| GradientSum::new(Arc::clone(g)))
            .collect();
        Ok(part)
    }

    /// The same part, each stage's "f" summing over `group(stage group)` instead (a test
    /// replaces the sum to show that it is needed).
    pub fn with_stage_gradient_groups(
        mut self,
        group: &dyn Fn(Arc<dyn Collective>) -> Arc<dyn Collective>,
    ) -> Self {
        self.stage_sums = self
            .stage_groups
            .iter()
            .map(|g| GradientSum::new(group(Arc::clone(g))))
            .collect();
        self
    }

    /// Each pipeline stage's group and its "f".
    pub(super) fn stage_groups(
        &self,
    ) -> impl Iterator<Item = (&Arc<dyn Collective>, &GradientSum)> {
        self.stage_groups.iter().zip(&self.stage_sums)
    }

    /// The first all-reduce failure of the pipeline stages' backward passes since the last
    /// call (Burn's backward cannot fail, so "f" keeps it).
    ///
    /// # Errors
    /// That failure.
    pub fn check_pipeline(&self) -> kiln_multi::Result<()> {
        self.stage_sums.iter().try_for_each(GradientSum::check)
    }

    /// The same part, summing the backward's activation gradients over `group` instead.
    pub fn with_gradient_group(mut self, group: Arc<dyn Collective>) -> Self {
        self.gradient_group = group;
        self
    }

    /// The whole model from every rank's part; every rank calls it together.
    ///
    /// # Errors
    /// When the all-gather fails.
    pub fn gather(&self, group: &dyn Collective) -> kiln_multi::Result<Gpt> {
        let world = group.world_size().get();
        let block = |b: &TensorParallelBlock| -> kiln_multi::Result<Block> {
            Ok(Block {
                ln_1: b.ln_1.clone(),
                attn: kiln_models::gpt::CausalSelfAttention {
                    c_attn: b.c_attn.gather_grouped(3, group)?,
                    c_proj: b.attn_proj.gather(group)?,
                    heads: b.heads * world,
                },
                ln_2: b.ln_2.clone(),
                mlp: Mlp {
                    c_fc: b.c_fc.gather(group)?,
                    c_proj: b.mlp_proj.gather(group)?,
                },
            })
        };
        Ok(Gpt {
            transformer: Transformer {
                wte: self.wte.clone(),
                wpe: self.wpe.clone(),
                h: self
                    .h
                    .iter()
                    .map(block)
                    .collect::<kiln_multi::Result<_>>()?,
                ln_f: self.ln_f.clone(),
            },
            lm_head: self.lm_head.clone(),
        })
    }

    /// The parameters holding this rank's share of the split layers.
    pub fn split_params(&self) -> Vec<burn::module::ParamId> {
        self.h
            .iter()
            .flat_map(|b| {
                [
                    b.c_attn.split_params(),
                    b.attn_proj.split_params(),
                    b.c_fc.split_params(),
                    b.mlp_proj.split_params(),
                ]
            })
            .flatten()
            .collect()
    }

    /// Sums over the ranks the gradients of the LayerNorms in front of the split layers,
    /// each rank's covering only its heads' or columns' share.
    ///
    /// # Errors
    /// When the all-reduce fails.
    pub fn sync_gradients(
        &self,
        grads: &mut GradientsParams,
        group: &dyn Collective,
    ) -> kiln_multi::Result<()> {
        let norms: Vec<(LayerNorm, LayerNorm)> = self
            .h
            .iter()
            .map(|b| (b.ln_1.clone(), b.ln_2.clone()))
            .collect();
        sum_gradients(&norms, grads, group)
    }

    /// The residual stream after the embeddings.
    fn embed(&self, inputs: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = inputs.dims();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &inputs.device()).reshape([1, t]);
        self.wte.forward(inputs) + self.wpe.forward(positions)
    }

    /// Mean cross-entropy of the final norm and head over the stream `x`.
    fn head_loss(&self, x: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        let [b, t, c] = x.dims();
        let x = norm(&self.ln_f, x).reshape([b * t, c]);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.wte.weight.val().transpose()),
        };
        burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, targets.reshape([b * t]))
    }

    /// The mean cross-entropy of a batch, every rank calling it together (no backward).
    ///
    /// # Errors
    /// When an all-reduce fails.
    pub fn loss(&self, batch: TokenBatch) -> kiln_multi::Result<Tensor<1>> {
        let mut x = self.embed(batch.inputs);
        for block in &self.h {
            for branch in [Branch::Attention, Branch::Mlp] {
                x = x.clone() + block.branch(branch, x, &*self.group)?;
            }
        }
        Ok(self.head_loss(x, batch.targets))
    }

    /// The loss and the gradients of this rank's part on a training batch, every rank
    /// calling it together: the forward cut at every sub-block, the backward run sub-block by
    /// sub-block from the top with Megatron's all-reduce of each branch's input gradient.
    ///
    /// # Errors
    /// When a collective fails.
    pub fn train_step(&self, batch: TokenBatch) -> StepResult<GradStep> {
        let [b, t] = batch.targets.dims();
        let embedded = self.embed(batch.inputs);
        let mut stream = embedded.clone().detach();
        let mut branches = Vec::with_capacity(2 * self.h.len());
        for block in &self.h {
            for branch in [Branch::Attention, Branch::Mlp] {
                let input = stream.clone().require_grad();
                let output = block.branch(branch, input.clone(), &*self.group)?;
                stream = stream + output.clone().detach();
                branches.push((input, output));
            }
        }
        let top = stream.require_grad();
        let loss = self.head_loss(top.clone(), batch.targets);
        let mut grads = loss.backward();
        let mut seed = top
            .grad_remove(&mut grads)
            .ok_or("the loss does not depend on the blocks")?;
        let mut parts = vec![GradientsParams::from_grads(grads, self)];
        for (input, output) in branches.into_iter().rev() {
            let mut grads = (output * seed.clone().autodiff()).sum().backward();
            let partial = input
                .grad_remove(&mut grads)
                .ok_or("a branch ignores its input")?;
            seed =
                seed + all_reduce_sum(partial, &*self.gradient_group, "a branch's input gradient")?;
            parts.push(GradientsParams::from_grads(grads, self));
        }
        let grads = (embedded * seed.autodiff()).sum().backward();
        parts.push(GradientsParams::from_grads(grads, self));
        Ok(GradStep {
            output: StepOutput::new(loss.detach(), b * t),
            grads: merge(self, parts),
        })
    }
}

impl TensorParallelBlock {
    /// A branch's output (before the residual add) on the stream `x`, the same on every rank.
    fn branch(
        &self,
        branch: Branch,
        x: Tensor<3>,
        group: &dyn Collective,
    ) -> kiln_multi::Result<Tensor<3>> {
        self.branch_with(branch, x, group, &|h| Ok(h))
    }

    /// [`branch`](Self::branch) with `front` applied to the normalised input of the split
    /// layers (Megatron's "f" as an autodiff op, [`kiln_multi::tensor_parallel::GradientSum`],
    /// in a pipeline stage).
    pub(super) fn branch_with(
        &self,
        branch: Branch,
        x: Tensor<3>,
        group: &dyn Collective,
        front: &dyn Fn(Tensor<3>) -> kiln_multi::Result<Tensor<3>>,
    ) -> kiln_multi::Result<Tensor<3>> {
        let [b, t, c] = x.dims();
        let out = match branch {
            Branch::Attention => {
                let y = self.attention(front(norm(&self.ln_1, x))?);
                let [_, _, local] = y.dims();
                self.attn_proj.forward(y.reshape([b * t, local]), group)?
            }
            Branch::Mlp => {
                let h = front(norm(&self.ln_2, x))?.reshape([b * t, c]);
                self.mlp_proj
                    .forward(kiln_kernels::gelu(self.c_fc.forward(h)), group)?
            }
        };
        Ok(out.reshape([b, t, c]))
    }

    /// Causal attention of this rank's heads: `[batch, tokens, heads x head width]`.
    fn attention(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let qkv = self.c_attn.forward(x.reshape([b * t, c]));
        let [_, width] = qkv.dims();
        kiln_kernels::causal_attention(qkv.reshape([b, t, width]), self.heads)
    }
}

/// One gradient per parameter: the sum of its parts (the tied embedding has two).
fn merge(model: &TensorParallelGpt, parts: Vec<GradientsParams>) -> GradientsParams {
    struct Merge {
        parts: Vec<GradientsParams>,
        merged: GradientsParams,
    }
    impl burn::module::ModuleVisitor for Merge {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let sum = self
                .parts
                .iter_mut()
                .filter_map(|p| p.remove::<D>(param.id))
                .reduce(|sum, grad| sum + grad);
            if let Some(sum) = sum {
                self.merged.register(param.id, sum);
            }
        }
    }
    let mut merge = Merge {
        parts,
        merged: GradientsParams::new(),
    };
    model.visit(&mut merge);
    merge.merged
}
