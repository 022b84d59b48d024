//! Sampling from a [`Gpt`], with a key/value cache.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Gpt, LayerCache};
use crate::error::{ImportError, Result};

/// How each next token is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax: below 1 sharpens, above 1 flattens; 0 always
    /// takes the most likely token (greedy decoding).
    pub temperature: f32,
    /// Only the `k` most likely tokens can be drawn; `None`: any token.
    pub top_k: Option<usize>,
    /// Seed of the draws: the same seed, model and prompt give the same text.
    pub seed: u64,
}

/// The keys and values of every block for the tokens a model has read so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &Gpt) -> Self {
        Self {
            layers: vec![None; model.transformer.h.len()],
            len: 0,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.len = 0;
    }
}

impl Gpt {
    /// Logits `[1, tokens, vocab]` for `tokens` read after those in `cache`, which then holds
    /// them too. The cache and the tokens together must fit in the block size.
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        device: &Device,
    ) -> Tensor<3> {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), device);
        let logits = self.forward_from(input, cache.len, Some(&mut cache.layers));
        cache.len += tokens.len();
        logits
    }
}

/// Appends `count` tokens drawn from `model` (on `device`, without autodiff) to `prompt`,
/// calling `emit` with each as it is drawn, and returns them.
///
/// Each prediction sees the last `block_size` tokens at most, as in nanoGPT. While they fit,
/// `use_cache` computes each new token's keys and values once; past the block size every
/// position shifts, so each step reads the whole window again (with or without the cache).
///
/// # Errors
/// [`ImportError::Config`] for an empty prompt, a token outside the vocabulary or logits
/// that are all NaN.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    count: usize,
    sampling: Sampling,
    use_cache: bool,
    device: &Device,
    mut emit: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let config = model.config();
    if prompt.is_empty() {
        return Err(ImportError::Config("the prompt is empty".into()));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(ImportError::Config(format!(
            "token {bad} is outside the model's vocabulary of {}",
            config.vocab_size
        )));
    }
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = KvCache::new(model);
    let mut fed = 0; // tokens of `tokens` the cache holds
    for _ in 0..count {
        let window_start = tokens.len().saturating_sub(config.block_size);
        if !use_cache || window_start > 0 {
            cache.clear();
            fed = window_start;
        }
        let logits = model.forward_cached(&tokens[fed..], &mut cache, device);
        fed = tokens.len();
        let next = draw(&last_row(logits)?, &sampling, &mut rng)?;
        emit(next);
        tokens.push(next);
    }
    Ok(tokens.split_off(prompt.len()))
}

/// The logits of the last position of `logits` `[1, tokens, vocab]`.
fn last_row(logits: Tensor<3>) -> Result<Vec<f32>> {
    let [_, t, vocab] = logits.dims();
    logits
        .narrow(1, t - 1, 1)
        .reshape([vocab])
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| ImportError::Config(format!("cannot read the logits: {e:?}")))
}

/// A token drawn from `logits` as `sampling` says.
pub(crate) fn draw(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> Result<u32> {
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    if order.is_empty() {
        return Err(ImportError::Config("the model's logits are all NaN".into()));
    }
    // Most likely first; equal logits keep the lower token first.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if sampling.temperature <= 0.0 {
        return Ok(order[0] as u32);
    }
    order.truncate(sampling.top_k.unwrap_or(order.len()).max(1));
    let best = logits[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i] - best) / sampling.temperature).exp())
        .collect();
    let mut point = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (&token, weight) in order.iter().zip(&weights) {
        if point < *weight {
            return Ok(token as u32);
        }
        point -= weight;
    }
    // Rounding can leave the point just past the last weight.
    Ok(order[order.len() - 1] as u32)
}
