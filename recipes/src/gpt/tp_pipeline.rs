//! Tensor parallelism inside pipeline stages (TP x PP): each tensor-parallel rank runs a
//! pipeline of its part's blocks, stage `s` of every rank forming a group of its own (a
//! duplicate of the rank's group, since the stages of a rank run at the same time).
//!
//! A stage's backward is Burn's own, run by the pipeline executor: Megatron's "f" (the sum of
//! the gradient at each split layer's input over the group) is an autodiff op
//! ([`GradientSum`], after each LayerNorm, so the LayerNorms' and the stream's gradients are
//! whole on every rank), "g" the row-parallel layers' forward all-reduce. The hand-walked
//! backward of [`TensorParallelGpt::train_step`] is not needed here, nor `sync_gradients`.

use std::num::NonZeroUsize;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::tensor::Tensor;
use kiln_models::gpt::{embed, stage_head};
use kiln_multi::Collective;
use kiln_multi::pipeline::{Activation, Pipeline, PipelineConfig, Targets, merge_grads};
use kiln_multi::tensor_parallel::GradientSum;
use kiln_trainer::data::TokenBatch;
use kiln_trainer::{GradStep, StepOutput, StepResult};

use super::tensor_parallel::{Branch, TensorParallelBlock, TensorParallelGpt};
use super::token_stages;

/// Consecutive blocks of a rank's tensor-parallel part as one pipeline stage: the embeddings
/// in the first, the final norm and head in the last (the tied embedding in both).
#[derive(Module, Debug)]
pub struct TensorParallelGptStage {
    /// The token embedding: in the first stage, and in the last when the head is tied.
    pub wte: Option<Embedding>,
    /// The position embedding: first stage only.
    pub wpe: Option<Embedding>,
    /// This stage's blocks, split.
    pub h: Vec<TensorParallelBlock>,
    /// The final norm: last stage only.
    pub ln_f: Option<LayerNorm>,
    /// The untied head: last stage only.
    pub lm_head: Option<Linear>,
    /// This stage's group.
    #[module(skip)]
    group: Arc<dyn Collective>,
    /// "f" over the stage's group.
    #[module(skip)]
    sum: GradientSum,
}

impl TensorParallelGpt {
    /// The part's stages, one per group of [`split_pipelined`](Self::split_pipelined), of
    /// equal block counts (checked before training).
    pub fn pipeline_stages(&self) -> Vec<TensorParallelGptStage> {
        let stages = self.stage_groups().count();
        let per = self.h.len() / stages.max(1);
        let last = stages.saturating_sub(1);
        self.stage_groups()
            .enumerate()
            .map(|(i, (group, sum))| TensorParallelGptStage {
                wte: (i == 0 || (i == last && self.lm_head.is_none())).then(|| self.wte.clone()),
                wpe: (i == 0).then(|| self.wpe.clone()),
                h: self.h[i * per..(i + 1) * per].to_vec(),
                ln_f: (i == last).then(|| self.ln_f.clone()),
                lm_head: self.lm_head.clone().filter(|_| i == last),
                group: Arc::clone(group),
                sum: sum.clone(),
            })
            .collect()
    }
}

impl TensorParallelGpt {
    /// The loss and gradients of this rank's part on a training batch through a pipeline of
    /// its stages under `config` (every rank of the group calling it together): Burn's
    /// backward in each stage, "f" summing the split layers' input gradients over the stage's
    /// group. The part must come from [`split_pipelined`](Self::split_pipelined).
    ///
    /// # Errors
    /// When the part has no stages, a stage fails, or a collective fails.
    pub fn train_step_pipelined(
        &self,
        batch: TokenBatch,
        config: PipelineConfig,
    ) -> StepResult<GradStep> {
        let [b, t] = batch.targets.dims();
        let device = batch.inputs.device();
        let count = NonZeroUsize::new(self.stage_groups().count())
            .ok_or("the part was split without pipeline stages")?;
        let pipeline = Pipeline::new(count, config)?;
        let mut stages = token_stages(
            self.pipeline_stages(),
            &vec![device.clone(); count.get()],
            TensorParallelGptStage::forward_tokens,
            TensorParallelGptStage::forward_hidden,
        );
        let input = Activation::Rank2(batch.inputs.float());
        let report = pipeline.run(&mut stages, input, Targets::Tokens(batch.targets))?;
        self.check_pipeline()?;
        let loss = Tensor::<1>::from_floats([report.loss as f32], &device);
        Ok(GradStep {
            output: StepOutput::new(loss, b * t),
            grads: merge_grads(self, &mut stages),
        })
    }
}

impl TensorParallelGptStage {
    /// The first stage on token ids `[batch, tokens]` carried as floats.
    ///
    /// # Panics
    /// On a stage without the embeddings, or when a collective fails: the pipeline catches
    /// the panic and fails the step with its message.
    pub fn forward_tokens(&self, tokens: Tensor<2>) -> Tensor<3> {
        let (Some(wte), Some(wpe)) = (&self.wte, &self.wpe) else {
            panic!("token ids reached a tensor-parallel stage without the embeddings");
        };
        self.forward_hidden(embed(wte, wpe, tokens.int(), 0))
    }

    /// The stage on the residual stream: its blocks, then in the last stage the logits.
    ///
    /// # Panics
    /// When a collective fails (see [`forward_tokens`](Self::forward_tokens)).
    pub fn forward_hidden(&self, x: Tensor<3>) -> Tensor<3> {
        let front = |h: Tensor<3>| self.sum.apply(h);
        let mut x = x;
        for block in &self.h {
            for branch in [Branch::Attention, Branch::Mlp] {
                let out = block
                    .branch_with(branch, x.clone(), &*self.group, &front)
                    .unwrap_or_else(|e| panic!("tensor-parallel stage: {e}"));
                x = x + out;
            }
        }
        stage_head(
            x,
            self.ln_f.as_ref(),
            self.lm_head.as_ref(),
            self.wte.as_ref(),
        )
    }
}
