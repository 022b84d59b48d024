//! The epilogue of a quantized layer, vectorised: rows of `i32` accumulators (one per output
//! channel) to floats or to the next layer's 7-bit codes, and the 2x2 max-pool of accumulator
//! rows before it.
//!
//! The arithmetic is written once ([`Epilogue::value`], [`ActQuant::code`]) and compiled for
//! AVX-512 and AVX2 through `target_feature` wrappers, so every level gives the same bits: a
//! multiply, then an add (never fused), a max, a clamp and a truncation, each rounded as IEEE
//! says whatever the vector width.

use super::ActQuant;
use crate::isa::{self, Isa};

/// Per output channel `o`: `y = max(mult[o] * acc + offset[o], floor)` in `f32`, `floor` 0
/// after a ReLU and `-inf` without (the affine map of a layer whose inputs and weights were
/// quantized: `mult = scale_in * scale_w[o]`, `offset = bias[o] - mult * zero_in * sum_k w`).
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per channel: what an accumulator is multiplied by.
    pub mult: &'a [f32],
    /// Per channel: what is added after.
    pub offset: &'a [f32],
    /// Whether negative values become 0.
    pub relu: bool,
}

impl Epilogue<'_> {
    /// The output channels.
    pub fn channels(&self) -> usize {
        self.mult.len().min(self.offset.len())
    }

    /// `y` of channel `o` for accumulator `acc`: the reference every vector level equals.
    #[inline(always)]
    pub fn value(&self, o: usize, acc: i32) -> f32 {
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        (self.mult[o] * acc as f32 + self.offset[o]).max(floor)
    }

    /// Each row of `acc` (rows `stride` apart, the first [`channels`](Self::channels) used) as
    /// codes of `q` into the rows of `out` (`channels` each); with `residual` (`channels`
    /// values per row), `y + residual` (added before the ReLU, as a residual block's last
    /// convolution does).
    ///
    /// # Panics
    /// When `out` holds more rows than `acc` or `residual`, or `stride < channels`.
    pub fn codes(
        &self,
        acc: &[i32],
        stride: usize,
        residual: Option<Residual>,
        q: ActQuant,
        out: &mut [u8],
    ) {
        self.codes_at(isa::active(), (acc, stride), residual, q, out);
    }

    /// [`codes`](Self::codes) at level `level`, which the CPU must support.
    fn codes_at(
        &self,
        level: Isa,
        (acc, stride): (&[i32], usize),
        residual: Option<Residual>,
        q: ActQuant,
        out: &mut [u8],
    ) {
        check(level, residual, out.len());
        // SAFETY (both): `check` made sure the CPU supports `level`.
        match level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { codes_avx512(self, acc, stride, residual, q, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { codes_avx2(self, acc, stride, residual, q, out) },
            _ => codes_body(self, acc, stride, residual, q, out),
        }
    }

    /// Each row of `acc` as floats `y` (plus `residual`) into the rows of `out`, as
    /// [`codes`](Self::codes).
    ///
    /// # Panics
    /// As [`codes`](Self::codes).
    pub fn floats(&self, acc: &[i32], stride: usize, residual: Option<Residual>, out: &mut [f32]) {
        self.floats_at(isa::active(), (acc, stride), residual, out);
    }

    /// [`floats`](Self::floats) at level `level`, which the CPU must support.
    fn floats_at(
        &self,
        level: Isa,
        (acc, stride): (&[i32], usize),
        residual: Option<Residual>,
        out: &mut [f32],
    ) {
        check(level, residual, out.len());
        // SAFETY (both): `check` made sure the CPU supports `level`.
        match level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { floats_avx512(self, acc, stride, residual, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { floats_avx2(self, acc, stride, residual, out) },
            _ => floats_body(self, acc, stride, residual, out),
        }
    }
}

/// What a residual block's last convolution adds before its ReLU, `channels` values per row.
#[derive(Debug, Clone, Copy)]
pub enum Residual<'a> {
    /// Floats (a shortcut projection's output).
    Floats(&'a [f32]),
    /// Codes of a map (the block's input), added as `scale * (code - zero_point)`.
    Codes(&'a [u8], ActQuant),
}

impl<'a> Residual<'a> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Residual::Floats(r) => r.len(),
            Residual::Codes(r, _) => r.len(),
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values `range`.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn part(&self, range: std::ops::Range<usize>) -> Residual<'a> {
        match *self {
            Residual::Floats(r) => Residual::Floats(&r[range]),
            Residual::Codes(r, q) => Residual::Codes(&r[range], q),
        }
    }
}

/// The checks before an epilogue runs at `level` into `outputs` values.
fn check(level: Isa, residual: Option<Residual>, outputs: usize) {
    assert!(level <= isa::detected(), "{level:?} is not supported here");
    assert!(
        residual.is_none_or(|r| r.len() >= outputs),
        "the residual is shorter than the output"
    );
}

/// The one loop every epilogue runs: per row of `acc` (rows `stride` apart) and channel `i`,
/// `put(max(mult[i] * acc + offset[i] + residual, floor))` into `out`'s rows of `channels`,
/// the residual read from `res`'s rows by `value` (rows of no residual: `res` empty).
#[inline(always)]
fn rows_body<T, R: Copy>(
    e: &Epilogue,
    (acc, stride): (&[i32], usize),
    (res, value): (&[R], impl Fn(R) -> f32),
    put: impl Fn(f32) -> T,
    out: &mut [T],
) {
    let n = e.channels();
    assert!(
        stride >= n,
        "rows of {stride} accumulators hold {n} channels"
    );
    let (mult, offset) = (&e.mult[..n], &e.offset[..n]);
    let floor = if e.relu { 0.0 } else { f32::NEG_INFINITY };
    for (k, (row, o)) in acc.chunks(stride).zip(out.chunks_exact_mut(n)).enumerate() {
        let row = &row[..n];
        match res.get(k * n..(k + 1) * n) {
            Some(r) => {
                for i in 0..n {
                    let y = mult[i] * row[i] as f32 + offset[i] + value(r[i]);
                    o[i] = put(y.max(floor));
                }
            }
            None => {
                for i in 0..n {
                    o[i] = put((mult[i] * row[i] as f32 + offset[i]).max(floor));
                }
            }
        }
    }
}

/// [`rows_body`] with `residual` read as its kind says, each output written by `put`.
#[inline(always)]
fn residual_body<T>(
    e: &Epilogue,
    acc: (&[i32], usize),
    residual: Option<Residual>,
    put: impl Fn(f32) -> T,
    out: &mut [T],
) {
    match residual {
        None => rows_body(e, acc, (&[] as &[f32], |v| v), put, out),
        Some(Residual::Floats(r)) => rows_body(e, acc, (r, |v| v), put, out),
        Some(Residual::Codes(r, rq)) => rows_body(e, acc, (r, |c| rq.value(c)), put, out),
    }
}

#[inline(always)]
fn codes_body(
    e: &Epilogue,
    acc: &[i32],
    stride: usize,
    residual: Option<Residual>,
    q: ActQuant,
    out: &mut [u8],
) {
    residual_body(e, (acc, stride), residual, |y| q.code(y), out);
}

#[inline(always)]
fn floats_body(
    e: &Epilogue,
    acc: &[i32],
    stride: usize,
    residual: Option<Residual>,
    out: &mut [f32],
) {
    residual_body(e, (acc, stride), residual, |y| y, out);
}

/// The 2x2 max-pool (stride 2) of two rows of `w` positions of accumulators (`rows`: `2 * w`
/// rows of `stride` values, the upper image row first) into `w / 2` rows of `out`. An odd
/// last column is dropped. Pooling accumulators equals pooling the outputs: the epilogue is
/// non-decreasing in the accumulator (`mult >= 0`).
///
/// # Panics
/// When the lengths do not match `w` and `stride`.
pub fn max_pool_2x2(rows: &[i32], w: usize, stride: usize, out: &mut [i32]) {
    pool_at(isa::active(), rows, w, stride, out);
}

/// [`max_pool_2x2`] at level `level`, which the CPU must support.
fn pool_at(level: Isa, rows: &[i32], w: usize, stride: usize, out: &mut [i32]) {
    assert_eq!(rows.len(), 2 * w * stride, "not 2 rows of {w} x {stride}");
    assert_eq!(out.len(), w / 2 * stride, "not {} x {stride}", w / 2);
    assert!(level <= isa::detected(), "{level:?} is not supported here");
    match level {
        // SAFETY (both): checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { pool_avx512(rows, w, stride, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { pool_avx2(rows, w, stride, out) },
        _ => pool_body(rows, w, stride, out),
    }
}

#[inline(always)]
fn pool_body(rows: &[i32], w: usize, stride: usize, out: &mut [i32]) {
    let (upper, lower) = rows.split_at(w * stride);
    for (px, o) in out.chunks_exact_mut(stride).enumerate() {
        let at = 2 * px * stride;
        let (a, b) = (
            &upper[at..at + stride],
            &upper[at + stride..at + 2 * stride],
        );
        let (c, d) = (
            &lower[at..at + stride],
            &lower[at + stride..at + 2 * stride],
        );
        for i in 0..stride {
            o[i] = a[i].max(b[i]).max(c[i].max(d[i]));
        }
    }
}

/// The bodies compiled for a vector level (the loops above vectorise at its width).
macro_rules! at_level {
    ($features:literal, $codes:ident, $floats:ident, $pool:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $codes(
            e: &Epilogue,
            acc: &[i32],
            stride: usize,
            residual: Option<Residual>,
            q: ActQuant,
            out: &mut [u8],
        ) {
            codes_body(e, acc, stride, residual, q, out)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $floats(
            e: &Epilogue,
            acc: &[i32],
            stride: usize,
            residual: Option<Residual>,
            out: &mut [f32],
        ) {
            floats_body(e, acc, stride, residual, out)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $pool(rows: &[i32], w: usize, stride: usize, out: &mut [i32]) {
            pool_body(rows, w, stride, out)
        }
    };
}

at_level!("avx512f,avx512bw", codes_avx512, floats_avx512, pool_avx512);
at_level!("avx2,fma", codes_avx2, floats_avx2, pool_avx2);

#[cfg(test)]
mod tests {
    use super::*;

    /// The levels this CPU runs.
    fn levels() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&l| l <= isa::detected())
            .collect()
    }

    /// Every level the CPU has gives the reference's bits, over values that round, clamp and
    /// are cut by the ReLU, with a row stride wider than the channels.
    #[test]
    fn every_level_equals_the_reference_bit_for_bit() {
        let (n, stride, rows) = (37, 48, 5);
        let mult: Vec<f32> = (0..n).map(|o| 1e-3 * (o as f32 + 0.37)).collect();
        let offset: Vec<f32> = (0..n).map(|o| (o as f32 - 18.0) * 0.11).collect();
        let acc: Vec<i32> = (0..rows * stride)
            .map(|i| ((i as i64 * 7919) % 20011 - 10005) as i32)
            .collect();
        let q = ActQuant::from_range(-2.0, 5.0);
        for relu in [true, false] {
            let e = Epilogue {
                mult: &mult,
                offset: &offset,
                relu,
            };
            let want_f: Vec<f32> = (0..rows * n)
                .map(|i| e.value(i % n, acc[i / n * stride + i % n]))
                .collect();
            let want_c: Vec<u8> = want_f.iter().map(|&v| q.code(v)).collect();
            for level in levels() {
                let mut codes = vec![0u8; rows * n];
                e.codes_at(level, (&acc, stride), None, q, &mut codes);
                assert_eq!(codes, want_c, "{level:?} relu {relu}");
                let mut floats = vec![0f32; rows * n];
                e.floats_at(level, (&acc, stride), None, &mut floats);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&floats), bits(&want_f), "{level:?} relu {relu}");
            }
        }
    }

    /// With a residual, at every level the CPU has, against the reference with the residual
    /// added before the ReLU.
    #[test]
    fn residuals_are_added_before_the_relu() {
        let (n, stride, rows) = (21, 32, 3);
        let mult: Vec<f32> = (0..n).map(|o| 2e-3 * (o as f32 + 0.5)).collect();
        let offset: Vec<f32> = (0..n).map(|o| (o as f32 - 10.0) * 0.07).collect();
        let acc: Vec<i32> = (0..rows * stride)
            .map(|i| (i as i32 * 37) % 1001 - 500)
            .collect();
        let residual: Vec<f32> = (0..rows * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = ActQuant::from_range(-1.0, 3.0);
        let e = Epilogue {
            mult: &mult,
            offset: &offset,
            relu: true,
        };
        let want: Vec<f32> = (0..rows * n)
            .map(|i| {
                let (r, o) = (i / n, i % n);
                (mult[o] * acc[r * stride + o] as f32 + offset[o] + residual[i]).max(0.0)
            })
            .collect();
        assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.5));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // A residual of codes adds their dequantized values, as the float one would.
        let rq = ActQuant::from_range(-1.0, 1.0);
        let coded: Vec<u8> = residual.iter().map(|&v| rq.code(v)).collect();
        let back: Vec<f32> = coded
            .iter()
            .map(|&c| rq.scale * (i32::from(c) - rq.zero_point) as f32)
            .collect();
        let acc = (&acc[..], stride);
        for level in levels() {
            let mut floats = vec![0.0; rows * n];
            e.floats_at(level, acc, Some(Residual::Floats(&residual)), &mut floats);
            assert_eq!(bits(&floats), bits(&want), "{level:?}");
            let mut codes = vec![0u8; rows * n];
            e.codes_at(level, acc, Some(Residual::Floats(&residual)), q, &mut codes);
            assert_eq!(codes, want.iter().map(|&v| q.code(v)).collect::<Vec<_>>());
            let (mut from_codes, mut from_floats) = (vec![0u8; rows * n], vec![0u8; rows * n]);
            let from = Some(Residual::Codes(&coded, rq));
            e.codes_at(level, acc, from, q, &mut from_codes);
            e.codes_at(
                level,
                acc,
                Some(Residual::Floats(&back)),
                q,
                &mut from_floats,
            );
            assert_eq!(from_codes, from_floats, "{level:?}");
            e.floats_at(level, acc, from, &mut floats);
            let mut want_back = vec![0.0; rows * n];
            e.floats_at(level, acc, Some(Residual::Floats(&back)), &mut want_back);
            assert_eq!(bits(&floats), bits(&want_back), "{level:?}");
        }
    }

    #[test]
    fn pooling_accumulators_takes_each_windows_maximum() {
        let (w, stride) = (5, 3);
        let rows: Vec<i32> = (0..2 * w * stride)
            .map(|i| ((i * 37) % 29) as i32 - 14)
            .collect();
        let at = |y: usize, x: usize, c: usize| rows[(y * w + x) * stride + c];
        let want: Vec<i32> = (0..w / 2 * stride)
            .map(|i| {
                let (px, c) = (i / stride, i % stride);
                [
                    at(0, 2 * px, c),
                    at(0, 2 * px + 1, c),
                    at(1, 2 * px, c),
                    at(1, 2 * px + 1, c),
                ]
                .into_iter()
                .max()
                .unwrap()
            })
            .collect();
        for level in levels() {
            let mut out = vec![0; w / 2 * stride];
            pool_at(level, &rows, w, stride, &mut out);
            assert_eq!(out, want, "{level:?}");
        }
    }
}
