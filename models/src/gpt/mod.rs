//! A GPT-style decoder-only transformer with nanoGPT's architecture and parameter names, so
//! that a nanoGPT (or kiln's PyTorch twin, `tests/data/gpt/generate.py`) `state_dict` loads
//! as it is:
//!
//! ```text
//! transformer.wte / wpe        token and position embeddings
//! transformer.h.N.ln_1         pre-LayerNorm of the attention
//! transformer.h.N.attn.c_attn  Q, K and V in one Linear (embed -> 3 * embed)
//! transformer.h.N.attn.c_proj  output projection
//! transformer.h.N.ln_2         pre-LayerNorm of the MLP
//! transformer.h.N.mlp.c_fc     embed -> 4 * embed, then GELU (erf)
//! transformer.h.N.mlp.c_proj   4 * embed -> embed
//! transformer.ln_f             final LayerNorm
//! lm_head                      absent when tied: the logits use transformer.wte's weights
//! ```
//!
//! No dropout (nanoGPT's small configurations train without it). [`generate`] samples with
//! a key/value cache.

mod generate;

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{ImportError, Result};
use crate::init::{UniformInit, constant};

pub use generate::{KvCache, Sampling, generate};

/// Standard deviation of nanoGPT's initial weights and embeddings.
const INIT_STD: f32 = 0.02;

/// The shape of a [`Gpt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Tokens the model knows (256 for bytes).
    pub vocab_size: usize,
    /// Longest context, in tokens (the position embedding's length).
    pub block_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block; `embed` divides by it.
    pub heads: usize,
    /// Width of the residual stream.
    pub embed: usize,
    /// The LM head shares the token embedding's weights (nanoGPT's weight tying).
    pub tied_head: bool,
}

impl GptConfig {
    /// The default of `kiln train gpt`: nanoGPT's "baby" Shakespeare model for CPUs (4
    /// layers, 4 heads, 128 wide, 64 tokens of context) over bytes.
    pub const fn small() -> Self {
        Self {
            vocab_size: 256,
            block_size: 64,
            layers: 4,
            heads: 4,
            embed: 128,
            tied_head: true,
        }
    }

    /// Checks that the sizes are positive and that the heads divide the width.
    ///
    /// # Errors
    /// [`ImportError::Config`] naming the bad size.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocabulary", self.vocab_size),
            ("block size", self.block_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("embedding width", self.embed),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(ImportError::Config(format!(
                "the GPT's {name} must be above 0"
            )));
        }
        if !self.embed.is_multiple_of(self.heads) {
            return Err(ImportError::Config(format!(
                "the embedding width {} does not divide into {} heads",
                self.embed, self.heads
            )));
        }
        Ok(())
    }

    /// The model on `device`, initialised as nanoGPT does (weights and embeddings from
    /// `N(0, 0.02)`, residual projections from `N(0, 0.02 / sqrt(2 * layers))`, biases 0,
    /// LayerNorms 1 and 0), drawn from `seed`.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device, seed: u64) -> Result<Gpt> {
        self.validate()?;
        let mut init = UniformInit::new(seed);
        let embedding = |rows: usize, init: &mut UniformInit| {
            let mut table: Embedding =
                burn::nn::EmbeddingConfig::new(rows, self.embed).init(device);
            table.weight = init.normal([rows, self.embed], INIT_STD, device);
            table
        };
        let wte = embedding(self.vocab_size, &mut init);
        let wpe = embedding(self.block_size, &mut init);
        let residual_std = INIT_STD / (2.0 * self.layers as f32).sqrt();
        let h = (0..self.layers)
            .map(|_| Block::init(self, residual_std, &mut init, device))
            .collect();
        let lm_head = (!self.tied_head).then(|| {
            linear(
                self.embed,
                self.vocab_size,
                INIT_STD,
                false,
                &mut init,
                device,
            )
        });
        Ok(Gpt {
            transformer: Transformer {
                wte,
                wpe,
                h,
                ln_f: layer_norm(self.embed, device),
            },
            lm_head,
        })
    }
}

/// A Linear of PyTorch's layout and nanoGPT's initialisation.
fn linear(
    inputs: usize,
    outputs: usize,
    std: f32,
    bias: bool,
    init: &mut UniformInit,
    device: &Device,
) -> Linear {
    let mut layer = LinearConfig::new(inputs, outputs)
        .with_bias(bias)
        .init(device);
    layer.weight = init.normal([inputs, outputs], std, device);
    layer.bias = bias.then(|| constant([outputs], 0.0, device));
    layer
}

fn layer_norm(width: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(width)
        .with_epsilon(LAYER_NORM_EPSILON)
        .init(device)
}

/// A decoder-only transformer over token ids.
#[derive(Module, Debug)]
pub struct Gpt {
    /// Embeddings, blocks and the final LayerNorm.
    pub transformer: Transformer,
    /// The untied LM head; `None` when the logits reuse `transformer.wte`.
    pub lm_head: Option<Linear>,
}

/// The embeddings, blocks and final norm of a [`Gpt`].
#[derive(Module, Debug)]
pub struct Transformer {
    /// Token embedding `[vocab, embed]`.
    pub wte: Embedding,
    /// Position embedding `[block_size, embed]`.
    pub wpe: Embedding,
    /// The blocks.
    pub h: Vec<Block>,
    /// The LayerNorm before the head.
    pub ln_f: LayerNorm,
}

/// A pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before the attention.
    pub ln_1: LayerNorm,
    /// Causal multi-head self-attention.
    pub attn: CausalSelfAttention,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// The feed-forward part.
    pub mlp: Mlp,
}

/// Causal multi-head self-attention with Q, K and V from one Linear.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// `embed -> 3 * embed`: Q, K, V side by side, each split into heads.
    pub c_attn: Linear,
    /// `embed -> embed`.
    pub c_proj: Linear,
    /// Heads.
    pub heads: usize,
}

/// `c_proj(gelu(c_fc(x)))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `embed -> 4 * embed`.
    pub c_fc: Linear,
    /// `4 * embed -> embed`.
    pub c_proj: Linear,
}

impl Block {
    fn init(
        config: &GptConfig,
        residual_std: f32,
        init: &mut UniformInit,
        device: &Device,
    ) -> Self {
        let c = config.embed;
        Self {
            ln_1: layer_norm(c, device),
            attn: CausalSelfAttention {
                c_attn: linear(c, 3 * c, INIT_STD, true, init, device),
                c_proj: linear(c, c, residual_std, true, init, device),
                heads: config.heads,
            },
            ln_2: layer_norm(c, device),
            mlp: Mlp {
                c_fc: linear(c, 4 * c, INIT_STD, true, init, device),
                c_proj: linear(4 * c, c, residual_std, true, init, device),
            },
        }
    }

    /// The block on `x` `[batch, tokens, embed]`; with a cache, the tokens follow those it
    /// holds, and their keys and values are added to it.
    pub fn forward(&self, x: Tensor<3>, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(norm(&self.ln_1, x), cache);
        x.clone() + self.mlp.forward(norm(&self.ln_2, x))
    }
}

/// The keys and values `[batch, heads, tokens, head_dim]` one block has seen.
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

impl CausalSelfAttention {
    /// Attention over `x` `[batch, tokens, embed]` (and the cached tokens before it).
    pub fn forward(&self, x: Tensor<3>, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let qkv = self.c_attn.forward(x);
        let Some(cache) = cache else {
            // Training and evaluation: one fused op from the packed projections.
            return self
                .c_proj
                .forward(kiln_kernels::causal_attention(qkv, self.heads));
        };
        let [q, mut k, mut v] = kiln_kernels::split_heads(qkv, self.heads);
        if let Some((past_k, past_v)) = cache.take() {
            k = Tensor::cat(vec![past_k, k], 2);
            v = Tensor::cat(vec![past_v, v], 2);
        }
        *cache = Some((k.clone(), v.clone()));
        let options = AttentionModuleOptions {
            is_causal: true,
            ..AttentionModuleOptions::default()
        };
        let y = attention(q, k, v, None, None, options);
        self.c_proj.forward(kiln_kernels::merge_heads(y))
    }
}

impl Mlp {
    /// The MLP on `x` `[batch, tokens, embed]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.c_proj
            .forward(kiln_kernels::gelu(self.c_fc.forward(x)))
    }
}

impl Gpt {
    /// The shape of this model (the heads are read from its first block).
    pub fn config(&self) -> GptConfig {
        let [vocab_size, embed] = self.transformer.wte.weight.dims();
        let [block_size, _] = self.transformer.wpe.weight.dims();
        GptConfig {
            vocab_size,
            block_size,
            layers: self.transformer.h.len(),
            heads: self.transformer.h.first().map_or(1, |b| b.attn.heads),
            embed,
            tied_head: self.lm_head.is_none(),
        }
    }

    /// Logits `[batch, tokens, vocab]` of the next token after each of `tokens`
    /// `[batch, tokens]` (at most `block_size` of them).
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_from(tokens, 0, None)
    }

    /// As [`forward`](Self::forward), for tokens at positions `start..` that follow what
    /// `caches` (one per block) hold, which gain their keys and values.
    pub fn forward_from(
        &self,
        tokens: Tensor<2, Int>,
        start: usize,
        mut caches: Option<&mut [LayerCache]>,
    ) -> Tensor<3> {
        let t = &self.transformer;
        let mut x = embed(&t.wte, &t.wpe, tokens, start);
        for (i, block) in t.h.iter().enumerate() {
            let cache = caches.as_deref_mut().and_then(|c| c.get_mut(i));
            x = block.forward(x, cache);
        }
        let x = norm(&t.ln_f, x);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => tied_logits(&t.wte, x),
        }
    }

    /// The model cut into `stages` pipeline stages of equal block counts, sharing its
    /// parameters: the embeddings go with the first, the final norm and head with the last
    /// (the token embedding with both when the head is tied to it).
    ///
    /// # Errors
    /// [`ImportError::Config`] when the blocks do not divide evenly into `stages`.
    pub fn pipeline_stages(&self, stages: usize) -> Result<Vec<GptStage>> {
        let layers = self.transformer.h.len();
        if stages == 0 || !layers.is_multiple_of(stages) {
            return Err(ImportError::Config(format!(
                "{layers} blocks do not split into {stages} pipeline stages of equal size"
            )));
        }
        let per_stage = layers / stages;
        let t = &self.transformer;
        Ok((0..stages)
            .map(|s| {
                let (first, last) = (s == 0, s + 1 == stages);
                GptStage {
                    wte: (first || (last && self.lm_head.is_none())).then(|| t.wte.clone()),
                    wpe: first.then(|| t.wpe.clone()),
                    h: t.h[s * per_stage..(s + 1) * per_stage].to_vec(),
                    ln_f: last.then(|| t.ln_f.clone()),
                    lm_head: if last { self.lm_head.clone() } else { None },
                }
            })
            .collect())
    }

    /// Mean cross-entropy (nats per token) of predicting `targets` `[batch, tokens]` from
    /// `inputs` `[batch, tokens]`: the training loss.
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let [b, t] = targets.dims();
        let logits = self.forward(inputs);
        let [_, _, vocab] = logits.dims();
        burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([b * t, vocab]), targets.reshape([b * t]))
    }
}

/// The epsilon of every LayerNorm of the GPT (nanoGPT's and PyTorch's default).
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// A GPT LayerNorm on `x` (kiln's kernel on the CPU, see [`kiln_kernels::layer_norm`]).
pub fn norm<const D: usize>(ln: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    kiln_kernels::layer_norm(ln, x, LAYER_NORM_EPSILON)
}

/// The residual stream of `tokens` at positions `start..`: token plus position embeddings.
pub fn embed(wte: &Embedding, wpe: &Embedding, tokens: Tensor<2, Int>, start: usize) -> Tensor<3> {
    let [_, t] = tokens.dims();
    let device = tokens.device();
    let positions =
        Tensor::<1, Int>::arange(start as i64..(start + t) as i64, &device).reshape([1, t]);
    wte.forward(tokens) + wpe.forward(positions)
}

/// Logits `[batch, tokens, vocab]` of normalised features through the token embedding's
/// transpose (the tied head).
pub fn tied_logits(wte: &Embedding, x: Tensor<3>) -> Tensor<3> {
    let [b, t, c] = x.dims();
    let table = wte.weight.val();
    let [vocab, _] = table.dims();
    x.reshape([b * t, c])
        .matmul(table.transpose())
        .reshape([b, t, vocab])
}

/// Consecutive blocks of a [`Gpt`] as one pipeline stage ([`Gpt::pipeline_stages`]): the
/// embeddings in the first stage, the final norm and head in the last.
#[derive(Module, Debug)]
pub struct GptStage {
    /// The token embedding: in the first stage, and in the last when the head is tied.
    pub wte: Option<Embedding>,
    /// The position embedding: first stage only.
    pub wpe: Option<Embedding>,
    /// This stage's blocks.
    pub h: Vec<Block>,
    /// The final norm: last stage only.
    pub ln_f: Option<LayerNorm>,
    /// The untied head: last stage only.
    pub lm_head: Option<Linear>,
}

impl GptStage {
    /// The first stage on token ids `[batch, tokens]` carried as floats (pipelines pass float
    /// activations; ids are exact below 2^24).
    ///
    /// # Panics
    /// On a stage without the embeddings, which [`Gpt::pipeline_stages`] gives to the first
    /// stage only (a pipeline catches the panic and fails the step with it).
    pub fn forward_tokens(&self, tokens: Tensor<2>) -> Tensor<3> {
        let (Some(wte), Some(wpe)) = (&self.wte, &self.wpe) else {
            panic!("token ids reached a GPT pipeline stage without the embeddings");
        };
        self.forward_hidden(embed(wte, wpe, tokens.int(), 0))
    }

    /// The stage on the residual stream `[batch, tokens, embed]`: its blocks, then, in the
    /// last stage, the logits `[batch, tokens, vocab]`.
    pub fn forward_hidden(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.h.iter().fold(x, |x, block| block.forward(x, None));
        stage_head(
            x,
            self.ln_f.as_ref(),
            self.lm_head.as_ref(),
            self.wte.as_ref(),
        )
    }
}

/// The end of a pipeline stage on the stream `x`: unchanged without the final norm (not the
/// last stage), else the logits through the untied head or the tied embedding `wte`.
pub fn stage_head(
    x: Tensor<3>,
    ln_f: Option<&LayerNorm>,
    lm_head: Option<&Linear>,
    wte: Option<&Embedding>,
) -> Tensor<3> {
    let Some(ln_f) = ln_f else {
        return x;
    };
    let x = norm(ln_f, x);
    match (lm_head, wte) {
        (Some(head), _) => head.forward(x),
        (None, Some(wte)) => tied_logits(wte, x),
        (None, None) => x,
    }
}

#[cfg(test)]
mod tests;
