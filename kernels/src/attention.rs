//! Causal multi-head self-attention from a packed `[batch, tokens, 3 x width]` input (queries,
//! keys and values side by side, each `heads` heads of `head_dim` values: GPT's `c_attn`
//! output), forward and backward, one parallel pass over the sequences each.
//!
//! Burn's path splits the input (three narrows, reshapes and transposes, each a copy), runs
//! attention as separate tensor ops (two batched products of 64 x 64 x 32 matrices, a scale, a
//! mask, a softmax of several ops) and its backward does as many again, plus a zero-filled
//! full-width buffer per narrow. Here each sequence's heads are gathered into small row-major
//! (or transposed) blocks that stay in cache, the scores of token `i` are computed only for the
//! tokens `j <= i` it sees, and the output and the gradient are written straight into their
//! packed layouts. The softmax probabilities are kept for the backward (as Burn's graph keeps
//! them). Plain multiplies and adds, reductions in index order: every instruction set gives the
//! same bits.

use rayon::prelude::*;

use crate::gelu::exp_nonpositive;
use crate::isa::{self, Isa};

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Values per token of the output: `heads x head_dim`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Length of the packed input `[batch, tokens, 3 x width]`.
    pub fn qkv_len(&self) -> usize {
        self.batch * self.tokens * 3 * self.width()
    }

    /// Length of the output `[batch, tokens, width]`.
    pub fn out_len(&self) -> usize {
        self.batch * self.tokens * self.width()
    }

    /// Length of the probabilities `[batch, heads, tokens, tokens]` (zero above the diagonal).
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.tokens * self.tokens
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// One head of one sequence, gathered out of the packed input into `tokens x head_dim` blocks
/// (one of them transposed), and the backward's scratch.
struct Head {
    /// Queries, row-major.
    q: Vec<f32>,
    /// Keys: transposed (forward) or row-major (backward).
    k: Vec<f32>,
    /// Values: row-major (forward) or transposed (backward).
    v: Vec<f32>,
    /// The head's output gradient, row-major (backward).
    dy: Vec<f32>,
    /// The scores' gradient and the probabilities, transposed (`tokens x tokens`, backward).
    ds_t: Vec<f32>,
    p_t: Vec<f32>,
    /// One row of the scores' gradient (backward).
    row: Vec<f32>,
}

impl Head {
    fn new(s: &AttentionShape) -> Self {
        let block = s.tokens * s.head_dim;
        let square = s.tokens * s.tokens;
        Self {
            q: vec![0.0; block],
            k: vec![0.0; block],
            v: vec![0.0; block],
            dy: vec![0.0; block],
            ds_t: vec![0.0; square],
            p_t: vec![0.0; square],
            row: vec![0.0; s.tokens],
        }
    }
}

/// Copies head `h` of part `part` (0 queries, 1 keys, 2 values) of one sequence's packed rows
/// (`stride` values per token) into `dst`, row-major `tokens x head_dim` or transposed.
#[inline(always)]
fn gather(
    s: &AttentionShape,
    rows: &[f32],
    stride: usize,
    offset: usize,
    t: bool,
    dst: &mut [f32],
) {
    let (n, d) = (s.tokens, s.head_dim);
    for i in 0..n {
        let src = &rows[i * stride + offset..i * stride + offset + d];
        if t {
            for (k, &v) in src.iter().enumerate() {
                dst[k * n + i] = v;
            }
        } else {
            dst[i * d..(i + 1) * d].copy_from_slice(src);
        }
    }
}

/// Output columns one register-resident accumulator holds.
const LANES: usize = 16;

/// `out[j] = sum_k x[k] * m[k * stride + j]` for `j < out.len()` (a row vector times a
/// matrix), the sum in `k` order. Columns go `LANES` at a time through a fixed-size
/// accumulator, which stays in registers over the whole `k` loop (an `out += x[k] * row` per
/// `k` would store and reload `out` each time). A last partial block runs whole when `m` has
/// the columns (they are computed and dropped), else one column at a time.
#[inline(always)]
fn vec_mat(x: &[f32], m: &[f32], stride: usize, out: &mut [f32]) {
    let block = |start: usize| {
        let mut acc = [0.0f32; LANES];
        for (k, &a) in x.iter().enumerate() {
            let row = &m[k * stride + start..][..LANES];
            for (acc, &v) in acc.iter_mut().zip(row) {
                *acc += a * v;
            }
        }
        acc
    };
    let len = out.len();
    let whole = len - len % LANES;
    for (b, out) in out[..whole].chunks_exact_mut(LANES).enumerate() {
        out.copy_from_slice(&block(b * LANES));
    }
    let tail = &mut out[whole..];
    let fits = whole + LANES <= stride && (x.len().max(1) - 1) * stride + whole + LANES <= m.len();
    if fits && !tail.is_empty() {
        tail.copy_from_slice(&block(whole)[..tail.len()]);
    } else {
        for (j, o) in tail.iter_mut().enumerate() {
            *o = 0.0;
            for (k, &a) in x.iter().enumerate() {
                *o += a * m[k * stride + whole + j];
            }
        }
    }
}

/// The largest value of `row` (finite), or `None` when it holds a NaN or an infinity; lane by
/// lane, so it vectorises (the result does not depend on the order).
#[inline(always)]
fn finite_max(row: &[f32]) -> Option<f32> {
    let (mut max, mut poison) = ([f32::NEG_INFINITY; LANES], [0.0f32; LANES]);
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((m, p), &v) in max.iter_mut().zip(&mut poison).zip(chunk) {
            *m = if v > *m { v } else { *m };
            // 0 for a finite value, NaN for a NaN or an infinity.
            *p += v * 0.0;
        }
    }
    let mut top = f32::NEG_INFINITY;
    let mut bad = false;
    for &v in max.iter().chain(chunks.remainder()) {
        top = if v > top { v } else { top };
    }
    for &v in poison.iter().chain(chunks.remainder()) {
        bad |= !(v * 0.0).is_finite();
    }
    (!bad).then_some(top)
}

/// `row = softmax(scale * row)` in place; a row with a NaN or an infinity becomes NaN (as
/// PyTorch's softmax gives NaN there).
#[inline(always)]
fn softmax(row: &mut [f32], scale: f32) {
    row.iter_mut().for_each(|v| *v *= scale);
    let Some(max) = finite_max(row) else {
        row.fill(f32::NAN);
        return;
    };
    // Separate loops: the exponentials vectorise only without the (ordered) sum in theirs.
    for v in row.iter_mut() {
        *v = exp_nonpositive(*v - max);
    }
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The forward of one sequence: `rows` its packed input, `out` its output rows, `probs` its
/// `heads x tokens x tokens` probabilities.
#[inline(always)]
fn forward_generic(
    s: &AttentionShape,
    rows: &[f32],
    out: &mut [f32],
    probs: &mut [f32],
    head: &mut Head,
) {
    let (n, d, w, scale) = (s.tokens, s.head_dim, s.width(), s.scale());
    for (h, probs) in probs.chunks_exact_mut(n * n).enumerate() {
        gather(s, rows, 3 * w, h * d, false, &mut head.q);
        gather(s, rows, 3 * w, w + h * d, true, &mut head.k);
        gather(s, rows, 3 * w, 2 * w + h * d, false, &mut head.v);
        for (i, p) in probs.chunks_exact_mut(n).enumerate() {
            let (seen, unseen) = p.split_at_mut(i + 1);
            vec_mat(&head.q[i * d..(i + 1) * d], &head.k, n, seen);
            softmax(seen, scale);
            unseen.fill(0.0);
            vec_mat(seen, &head.v, d, &mut out[i * w + h * d..][..d]);
        }
    }
}

/// The backward of one sequence: `grad` (its packed rows) gets the gradient of `rows` given
/// the gradient `dout` of its output.
///
/// Row `i` of the scores' gradient is `dS = P (dY V^T - <P, dY V^T>)` (scaled as the scores
/// were); then `dQ = dS K`, `dK = dS^T Q` and `dV = P^T dY`, the last two from transposed
/// copies of `dS` and `P` so that every product is a row times a matrix.
#[inline(always)]
fn backward_generic(
    s: &AttentionShape,
    (rows, probs, dout): (&[f32], &[f32], &[f32]),
    grad: &mut [f32],
    head: &mut Head,
) {
    let (n, d, w, scale) = (s.tokens, s.head_dim, s.width(), s.scale());
    for (h, probs) in probs.chunks_exact(n * n).enumerate() {
        gather(s, rows, 3 * w, h * d, false, &mut head.q);
        gather(s, rows, 3 * w, w + h * d, false, &mut head.k);
        gather(s, rows, 3 * w, 2 * w + h * d, true, &mut head.v);
        gather(s, dout, w, h * d, false, &mut head.dy);
        for (i, p) in probs.chunks_exact(n).enumerate() {
            let (p, dy) = (&p[..=i], &head.dy[i * d..(i + 1) * d]);
            let ds = &mut head.row[..=i];
            vec_mat(dy, &head.v, n, ds);
            let dot: f32 = p.iter().zip(ds.iter()).map(|(a, b)| a * b).sum();
            for (j, (g, &pj)) in ds.iter_mut().zip(p).enumerate() {
                *g = pj * (*g - dot) * scale;
                head.ds_t[j * n + i] = *g;
                head.p_t[j * n + i] = pj;
            }
            vec_mat(ds, &head.k, d, &mut grad[i * 3 * w + h * d..][..d]);
        }
        for j in 0..n {
            let at = j * 3 * w + h * d;
            let (ds_col, p_col) = (
                &head.ds_t[j * n + j..(j + 1) * n],
                &head.p_t[j * n + j..(j + 1) * n],
            );
            vec_mat(ds_col, &head.q[j * d..], d, &mut grad[at + w..][..d]);
            vec_mat(p_col, &head.dy[j * d..], d, &mut grad[at + 2 * w..][..d]);
        }
    }
}

/// One sequence's forward on the widest vectors `isa` allows.
fn forward_sequence(
    isa: Isa,
    s: &AttentionShape,
    rows: &[f32],
    out: &mut [f32],
    probs: &mut [f32],
    head: &mut Head,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(
            s: &AttentionShape,
            rows: &[f32],
            out: &mut [f32],
            probs: &mut [f32],
            head: &mut Head,
        ) {
            forward_generic(s, rows, out, probs, head);
        }
        #[target_feature(enable = "avx2")]
        fn avx2(
            s: &AttentionShape,
            rows: &[f32],
            out: &mut [f32],
            probs: &mut [f32],
            head: &mut Head,
        ) {
            forward_generic(s, rows, out, probs, head);
        }
        // SAFETY: `isa` never exceeds what the CPU reported (`isa::active`).
        match isa {
            Isa::Avx512 => return unsafe { avx512(s, rows, out, probs, head) },
            Isa::Avx2 => return unsafe { avx2(s, rows, out, probs, head) },
            Isa::Scalar => {}
        }
    }
    forward_generic(s, rows, out, probs, head);
}

/// One sequence's backward on the widest vectors `isa` allows.
fn backward_sequence(
    isa: Isa,
    s: &AttentionShape,
    inputs: (&[f32], &[f32], &[f32]),
    grad: &mut [f32],
    head: &mut Head,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(
            s: &AttentionShape,
            inputs: (&[f32], &[f32], &[f32]),
            grad: &mut [f32],
            head: &mut Head,
        ) {
            backward_generic(s, inputs, grad, head);
        }
        #[target_feature(enable = "avx2")]
        fn avx2(
            s: &AttentionShape,
            inputs: (&[f32], &[f32], &[f32]),
            grad: &mut [f32],
            head: &mut Head,
        ) {
            backward_generic(s, inputs, grad, head);
        }
        // SAFETY: `isa` never exceeds what the CPU reported (`isa::active`).
        match isa {
            Isa::Avx512 => return unsafe { avx512(s, inputs, grad, head) },
            Isa::Avx2 => return unsafe { avx2(s, inputs, grad, head) },
            Isa::Scalar => {}
        }
    }
    backward_generic(s, inputs, grad, head);
}

/// Causal attention of `qkv` (`[batch, tokens, 3 x width]`, queries, keys, values) into `out`
/// (`[batch, tokens, width]`), the softmax probabilities into `probs`
/// (`[batch, heads, tokens, tokens]`), scores scaled by `1 / sqrt(head_dim)`.
///
/// # Panics
/// When a length does not fit `shape`.
pub fn causal_attention(s: &AttentionShape, qkv: &[f32], out: &mut [f32], probs: &mut [f32]) {
    forward_on(isa::active(), s, qkv, out, probs);
}

/// The gradient `grad_qkv` of [`causal_attention`]'s input, given its input, its
/// probabilities and the gradient `grad_out` of its output.
///
/// # Panics
/// When a length does not fit `shape`.
pub fn causal_attention_backward(
    s: &AttentionShape,
    (qkv, probs, grad_out): (&[f32], &[f32], &[f32]),
    grad_qkv: &mut [f32],
) {
    backward_on(isa::active(), s, (qkv, probs, grad_out), grad_qkv);
}

fn check_lengths(s: &AttentionShape, qkv: usize, out: usize, probs: usize) {
    assert_eq!(
        (qkv, out, probs),
        (s.qkv_len(), s.out_len(), s.probs_len()),
        "attention lengths for {s:?}"
    );
}

fn forward_on(isa: Isa, s: &AttentionShape, qkv: &[f32], out: &mut [f32], probs: &mut [f32]) {
    check_lengths(s, qkv.len(), out.len(), probs.len());
    if s.out_len() == 0 {
        return;
    }
    let n = s.tokens;
    out.par_chunks_mut(n * s.width())
        .zip(probs.par_chunks_mut(s.heads * n * n))
        .zip(qkv.par_chunks(3 * n * s.width()))
        .for_each_init(
            || Head::new(s),
            |head, ((out, probs), rows)| forward_sequence(isa, s, rows, out, probs, head),
        );
}

fn backward_on(isa: Isa, s: &AttentionShape, inputs: (&[f32], &[f32], &[f32]), grad: &mut [f32]) {
    let (qkv, probs, dout) = inputs;
    check_lengths(s, qkv.len(), dout.len(), probs.len());
    assert_eq!(grad.len(), qkv.len(), "attention input gradient length");
    if s.out_len() == 0 {
        return;
    }
    let n = s.tokens;
    let w = s.width();
    grad.par_chunks_mut(3 * n * w)
        .zip(qkv.par_chunks(3 * n * w))
        .zip(probs.par_chunks(s.heads * n * n))
        .zip(dout.par_chunks(n * w))
        .for_each_init(
            || Head::new(s),
            |head, (((grad, rows), probs), dout)| {
                backward_sequence(isa, s, (rows, probs, dout), grad, head)
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replayable pseudo-random sequence in `[-1, 1)`.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The definition in `f64`: per head, `softmax(q k^T / sqrt(d) + causal mask) v`.
    fn reference(s: &AttentionShape, qkv: &[f64]) -> Vec<f64> {
        let (n, d, w) = (s.tokens, s.head_dim, s.width());
        let at = |b: usize, i: usize, part: usize, h: usize, k: usize| {
            qkv[(b * n + i) * 3 * w + part * w + h * d + k]
        };
        let mut out = vec![0.0; s.out_len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..n {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|k| at(b, i, 0, h, k) * at(b, j, 1, h, k))
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for k in 0..d {
                        out[(b * n + i) * w + h * d + k] =
                            (0..=i).map(|j| e[j] / sum * at(b, j, 2, h, k)).sum::<f64>();
                    }
                }
            }
        }
        out
    }

    fn shape() -> AttentionShape {
        AttentionShape {
            batch: 3,
            tokens: 9,
            heads: 2,
            head_dim: 5,
        }
    }

    fn run(isa: Isa, s: &AttentionShape, qkv: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; s.out_len()];
        let mut probs = vec![0.0; s.probs_len()];
        forward_on(isa, s, qkv, &mut out, &mut probs);
        let mut grad = vec![0.0; s.qkv_len()];
        backward_on(isa, s, (qkv, &probs, dout), &mut grad);
        (out, grad)
    }

    #[test]
    fn output_and_gradient_match_the_definition() {
        let s = shape();
        let qkv: Vec<f32> = values(s.qkv_len(), 1).iter().map(|v| 3.0 * v).collect();
        let dout = values(s.out_len(), 2);
        let (out, grad) = run(isa::active(), &s, &qkv, &dout);
        let qkv64: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
        for (i, (&got, want)) in out.iter().zip(reference(&s, &qkv64)).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 1e-5,
                "out[{i}] = {got}, want {want}"
            );
        }
        // The gradient of sum(dout * out) by central differences of the f64 definition.
        let loss = |x: &[f64]| -> f64 {
            reference(&s, x)
                .iter()
                .zip(&dout)
                .map(|(y, &g)| y * f64::from(g))
                .sum()
        };
        for (i, &got) in grad.iter().enumerate() {
            let (mut up, mut down) = (qkv64.clone(), qkv64.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let want = (loss(&up) - loss(&down)) / 2e-6;
            assert!(
                (f64::from(got) - want).abs() <= 1e-5,
                "grad[{i}] = {got}, want {want}"
            );
        }
    }

    #[test]
    fn every_isa_gives_the_same_bits_and_nan_stays_nan() {
        let s = AttentionShape {
            batch: 2,
            tokens: 37,
            heads: 3,
            head_dim: 19,
        };
        let qkv = values(s.qkv_len(), 3);
        let dout = values(s.out_len(), 4);
        let (out, grad) = run(Isa::Scalar, &s, &qkv, &dout);
        for isa in [Isa::Avx2, Isa::Avx512] {
            if isa > isa::detected() {
                continue;
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let (other_out, other_grad) = run(isa, &s, &qkv, &dout);
            assert_eq!(bits(&out), bits(&other_out), "{isa:?} forward");
            assert_eq!(bits(&grad), bits(&other_grad), "{isa:?} backward");
        }
        // A NaN key of the first token reaches every later query of its sequence and head.
        let mut poisoned = qkv.clone();
        poisoned[s.width()] = f32::NAN;
        let (out, _) = run(isa::active(), &s, &poisoned, &dout);
        let w = s.width();
        for i in 0..s.tokens {
            assert!(out[i * w].is_nan(), "token {i} of the poisoned head");
        }
        assert!(
            out[s.tokens * w..].iter().all(|v| v.is_finite()),
            "other sequence"
        );
    }
}
