//! Integer GEMM for quantized inference: `C (M x N, i32) = A (M x K, u8) . W^T (W: N x K, i8)`.
//!
//! Activations are unsigned 7-bit (`0..=127`, as PyTorch's x86 backend quantizes them with
//! `reduce_range`), weights signed 8-bit, sums exact in `i32`. With 7-bit activations the AVX2
//! kernel's `vpmaddubsw` (pairs of products summed into a saturating `i16`) can never saturate
//! (`2 * 127 * 128 < 32767`), so every kernel gives the same integers:
//! - AVX-512 VNNI: `vpdpbusd` on 512 bits, 8 rows x 32 columns per tile;
//! - AVX-VNNI: `vpdpbusd` on 256 bits (VEX), 4 rows x 16 columns;
//! - AVX2: `vpmaddubsw` + `vpmaddwd`, 4 rows x 16 columns;
//! - scalar, the reference.
//!
//! [`PackedWeights`] lays W out once per layer: K padded to a multiple of 4 (zeros), N to a
//! multiple of 16, in panels of 16 output channels where each group of 4 `k` is 64 bytes, `k`
//! fastest (the operand layout of `vpdpbusd`). A's rows are padded to the same `K4` (see
//! [`PackedWeights::k_padded`]). Rows are split across threads in blocks.

use rayon::prelude::*;

use crate::isa::Isa;

mod epilogue;

pub use epilogue::{Epilogue, Residual, max_pool_2x2};

/// Output channels per weight panel.
pub const PANEL: usize = 16;

/// The largest activation code: activations are 7-bit.
pub const ACT_MAX: u8 = 127;

/// The integer kernel [`gemm_u8i8`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Int8Kernel {
    /// Plain Rust.
    Scalar,
    /// `vpmaddubsw` + `vpmaddwd` on 256 bits.
    Avx2,
    /// `vpdpbusd` on 256 bits (AVX-VNNI).
    AvxVnni,
    /// `vpdpbusd` on 512 bits (AVX-512 VNNI).
    Avx512Vnni,
}

impl Int8Kernel {
    /// The name reports print (`avx512-vnni`, `avx-vnni`, `avx2`, `scalar`).
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Scalar => "scalar",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::AvxVnni => "avx-vnni",
            Int8Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Int8Kernel::Scalar => true,
                Int8Kernel::Avx2 => has!("avx2"),
                Int8Kernel::AvxVnni => has!("avx2") && has!("avxvnni"),
                Int8Kernel::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Int8Kernel::Scalar
        }
    }

    /// The fastest kernel the active instruction-set level ([`crate::isa::active`]) allows:
    /// a cap of `avx2` means an AVX2-only machine, so no VNNI.
    pub fn active() -> Int8Kernel {
        let candidates = match crate::isa::active() {
            Isa::Avx512 => &[
                Int8Kernel::Avx512Vnni,
                Int8Kernel::AvxVnni,
                Int8Kernel::Avx2,
            ][..],
            Isa::Avx2 => &[Int8Kernel::Avx2][..],
            Isa::Scalar => &[][..],
        };
        candidates
            .iter()
            .copied()
            .find(|k| k.supported())
            .unwrap_or(Int8Kernel::Scalar)
    }

    /// Every kernel this CPU can run.
    pub fn all_supported() -> Vec<Int8Kernel> {
        [
            Int8Kernel::Scalar,
            Int8Kernel::Avx2,
            Int8Kernel::AvxVnni,
            Int8Kernel::Avx512Vnni,
        ]
        .into_iter()
        .filter(|k| k.supported())
        .collect()
    }
}

/// A layer's int8 weights (`N x K`, row-major as given) packed for [`gemm_u8i8`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    data: Vec<i8>,
    col_sums: Vec<i32>,
}

impl PackedWeights {
    /// Packs `w` (`n x k`, row `o` holding output channel `o`'s `k` weights).
    ///
    /// # Panics
    /// When `w.len() != n * k` (a caller's bug: shapes come from the layer).
    pub fn new(w: &[i8], n: usize, k: usize) -> PackedWeights {
        assert_eq!(w.len(), n * k, "weights are not {n} x {k}");
        let k4 = k.div_ceil(4) * 4;
        let n16 = n.div_ceil(PANEL) * PANEL;
        let mut data = vec![0i8; n16 * k4];
        for o in 0..n {
            for kk in 0..k {
                data[Self::offset(k4, o, kk)] = w[o * k + kk];
            }
        }
        let col_sums = (0..n)
            .map(|o| w[o * k..(o + 1) * k].iter().map(|&v| v as i32).sum())
            .collect();
        PackedWeights {
            n,
            k,
            data,
            col_sums,
        }
    }

    /// Where weight `(o, kk)` lives in the packed buffer.
    fn offset(k4: usize, o: usize, kk: usize) -> usize {
        let (panel, lane) = (o / PANEL, o % PANEL);
        ((panel * (k4 / 4) + kk / 4) * PANEL + lane) * 4 + kk % 4
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per output channel.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The row length of A and of the packed weights: K rounded up to a multiple of 4.
    pub fn k_padded(&self) -> usize {
        self.k.div_ceil(4) * 4
    }

    /// The row length of C: N rounded up to a multiple of [`PANEL`].
    pub fn n_padded(&self) -> usize {
        self.n.div_ceil(PANEL) * PANEL
    }

    /// `sum_k W[o, k]` per output channel, for the activations' zero point.
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums
    }

    fn panels(&self) -> usize {
        self.n_padded() / PANEL
    }

    /// Panel `p`'s bytes: `k_padded / 4` groups of 64.
    fn panel(&self, p: usize) -> &[i8] {
        let len = self.k_padded() * PANEL;
        &self.data[p * len..(p + 1) * len]
    }
}

/// Rows of A per parallel task.
const ROW_BLOCK: usize = 64;

/// `c[m][o] = sum_k a[m][k] * W[o][k]` for `m < rows`, with the kernel [`Int8Kernel::active`]
/// picks. `a` is `rows x k_padded` (padding columns may hold anything: their weights are 0),
/// each block of rows is computed into a small `i32` tile (rows of `n_padded`) and handed to
/// `epilogue(tile, out_rows)` at once, while it is in cache, to turn into `out` (`rows x
/// out_cols`: bias, scale, ReLU, requantisation); the whole `i32` product never exists.
///
/// # Panics
/// When the slice lengths do not match `rows` and the packed shape.
pub fn gemm_u8i8<T: Send, F>(
    a: &[u8],
    rows: usize,
    w: &PackedWeights,
    out: &mut [T],
    out_cols: usize,
    epilogue: F,
) where
    F: Fn(&[i32], &mut [T]) + Sync,
{
    let kernel = Int8Kernel::active();
    gemm_u8i8_with(kernel, a, rows, w, (out, out_cols), epilogue);
}

/// [`gemm_u8i8`] with a chosen kernel (tests and benchmarks compare them).
///
/// # Panics
/// As [`gemm_u8i8`], and when `kernel` is not [`Int8Kernel::supported`] here.
pub fn gemm_u8i8_with<T: Send, F>(
    kernel: Int8Kernel,
    a: &[u8],
    rows: usize,
    w: &PackedWeights,
    (out, out_cols): (&mut [T], usize),
    epilogue: F,
) where
    F: Fn(&[i32], &mut [T]) + Sync,
{
    let (k4, n16) = (w.k_padded(), w.n_padded());
    assert_eq!(a.len(), rows * k4, "A is not {rows} x {k4}");
    assert_eq!(
        out.len(),
        rows * out_cols,
        "the output is not {rows} x {out_cols}"
    );
    assert!(
        kernel.supported(),
        "{} is not supported here",
        kernel.name()
    );
    let block = |c: &mut Vec<i32>, (a, out): (&[u8], &mut [T])| {
        c.resize(a.len() / k4 * n16, 0);
        block_gemm(kernel, a, w, c);
        epilogue(c, out);
    };
    let out_block = ROW_BLOCK * out_cols;
    if rows > ROW_BLOCK {
        a.par_chunks(ROW_BLOCK * k4)
            .zip(out.par_chunks_mut(out_block))
            .for_each_init(Vec::new, block);
    } else {
        let mut c = Vec::new();
        a.chunks(ROW_BLOCK * k4)
            .zip(out.chunks_mut(out_block))
            .for_each(|pair| block(&mut c, pair));
    }
}

/// `c = A . W^T` for `rows` rows of `a` (`rows x k_padded`) on the calling thread, into `c`
/// (resized to `rows x n_padded`): for callers that split the work themselves, e.g. one
/// image's convolution per task, with the epilogue applied to `c` while it is in cache.
///
/// # Panics
/// When `a.len() != rows * k_padded`.
pub fn gemm_u8i8_rows(a: &[u8], rows: usize, w: &PackedWeights, c: &mut Vec<i32>) {
    let k4 = w.k_padded();
    assert_eq!(a.len(), rows * k4, "A is not {rows} x {k4}");
    c.resize(rows * w.n_padded(), 0);
    block_gemm(Int8Kernel::active(), a, w, c);
}

/// One block of rows, every panel.
fn block_gemm(kernel: Int8Kernel, a: &[u8], w: &PackedWeights, c: &mut [i32]) {
    let (k4, n16) = (w.k_padded(), w.n_padded());
    let rows = a.len() / k4;
    let tile = Tile { a, k4, c, ldc: n16 };
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `gemm_u8i8_with` checked that the CPU supports the kernel.
        Int8Kernel::Avx512Vnni => unsafe { x86::avx512_vnni(tile, rows, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Int8Kernel::AvxVnni => unsafe { x86::avx_vnni(tile, rows, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Int8Kernel::Avx2 => unsafe { x86::avx2(tile, rows, w) },
        _ => scalar(tile, rows, w),
    }
}

/// A block of A's rows and the matching rows of C.
struct Tile<'a> {
    a: &'a [u8],
    k4: usize,
    c: &'a mut [i32],
    ldc: usize,
}

/// The reference: one dot product per output, in `i32`.
fn scalar(tile: Tile, rows: usize, w: &PackedWeights) {
    let k4 = tile.k4;
    for r in 0..rows {
        let a = &tile.a[r * k4..(r + 1) * k4];
        for p in 0..w.panels() {
            let panel = w.panel(p);
            for lane in 0..PANEL {
                let mut acc = 0i32;
                for (g, quad) in a.chunks_exact(4).enumerate() {
                    let wq = &panel[(g * PANEL + lane) * 4..][..4];
                    acc += quad
                        .iter()
                        .zip(wq)
                        .map(|(&x, &y)| x as i32 * y as i32)
                        .sum::<i32>();
                }
                tile.c[r * tile.ldc + p * PANEL + lane] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels. Each walks the block in tiles of `R` rows by one or two panels,
    //! broadcasting 4 bytes of a row of A against a panel's 64-byte `k` group.
    use std::arch::x86_64::*;

    use super::{PANEL, PackedWeights, Tile};

    /// Pointers to the starts of rows `r0..r0 + R` of A, whose `k4` bytes each are checked
    /// to be in the tile once here, so the inner loops read them without bounds checks.
    #[inline(always)]
    fn row_starts<const R: usize>(tile: &Tile, r0: usize) -> [*const u8; R] {
        assert!(
            (r0 + R) * tile.k4 <= tile.a.len(),
            "rows {r0}.. are past the tile"
        );
        std::array::from_fn(|i| tile.a[(r0 + i) * tile.k4..].as_ptr())
    }

    /// Four bytes of a row from group `g`, as one `i32` (one unaligned load).
    ///
    /// # Safety
    /// `row` is one of [`row_starts`]' pointers and `g < k4 / 4`.
    #[inline(always)]
    unsafe fn quad(row: *const u8, g: usize) -> i32 {
        // SAFETY: the caller's row holds k4 bytes, and 4 * g + 4 <= k4.
        unsafe { row.add(4 * g).cast::<i32>().read_unaligned() }
    }

    /// Calls `f(row, rows_in_tile, panel, panels_in_tile)` over the tiles of a block: up to
    /// `max_rows` rows (then 4, then 1 for the tail) by up to `max_panels` panels. The smaller
    /// operand is the one re-read: rows of A outermost when the block has at least as many
    /// rows as W has columns, else W's panels (e.g. ResNet's layer4 on one image: 49 rows,
    /// 2.4 MB of weights, which would otherwise be streamed once per tile of rows).
    #[inline(always)]
    fn for_tiles(
        rows: usize,
        w: &PackedWeights,
        (max_rows, max_panels): (usize, usize),
        mut f: impl FnMut(usize, usize, usize, usize),
    ) {
        let row_step = |left: usize| match left {
            _ if left >= max_rows => max_rows,
            4.. => 4,
            _ => 1,
        };
        let panel_step = |left: usize| left.min(max_panels);
        let panels = w.panels();
        if rows >= w.n_padded() {
            let mut r = 0;
            while r < rows {
                let take = row_step(rows - r);
                let mut p = 0;
                while p < panels {
                    let count = panel_step(panels - p);
                    f(r, take, p, count);
                    p += count;
                }
                r += take;
            }
        } else {
            let mut p = 0;
            while p < panels {
                let count = panel_step(panels - p);
                let mut r = 0;
                while r < rows {
                    let take = row_step(rows - r);
                    f(r, take, p, count);
                    r += take;
                }
                p += count;
            }
        }
    }

    /// AVX-512 VNNI: tiles of up to 8 rows x 2 panels (16 accumulators).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn avx512_vnni(mut tile: Tile, rows: usize, w: &PackedWeights) {
        for_tiles(rows, w, (8, 2), |r, take, p, panels| match (take, panels) {
            (8, 2) => tile_512::<8, 2>(&mut tile, r, p, w),
            (8, _) => tile_512::<8, 1>(&mut tile, r, p, w),
            (4, 2) => tile_512::<4, 2>(&mut tile, r, p, w),
            (4, _) => tile_512::<4, 1>(&mut tile, r, p, w),
            (_, 2) => tile_512::<1, 2>(&mut tile, r, p, w),
            (_, _) => tile_512::<1, 1>(&mut tile, r, p, w),
        });
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn tile_512<const R: usize, const P: usize>(
        tile: &mut Tile,
        r0: usize,
        p0: usize,
        w: &PackedWeights,
    ) {
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        let panels: [&[i8]; P] = std::array::from_fn(|j| w.panel(p0 + j));
        let rows = row_starts::<R>(tile, r0);
        for g in 0..tile.k4 / 4 {
            // SAFETY: each panel holds k4 / 4 groups of 64 bytes.
            let b: [__m512i; P] = std::array::from_fn(|j| unsafe {
                _mm512_loadu_si512(panels[j].as_ptr().add(g * 64).cast())
            });
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: g < k4 / 4.
                let a = _mm512_set1_epi32(unsafe { quad(rows[i], g) });
                for j in 0..P {
                    row[j] = _mm512_dpbusd_epi32(row[j], a, b[j]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let at = (r0 + i) * tile.ldc + (p0 + j) * PANEL;
                // SAFETY: C's row holds n_padded >= (p0 + P) * 16 values.
                unsafe { _mm512_storeu_si512(tile.c[at..at + PANEL].as_mut_ptr().cast(), *v) };
            }
        }
    }

    /// AVX-VNNI: tiles of up to 4 rows x 1 panel (two 8-lane halves, 8 accumulators).
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn avx_vnni(mut tile: Tile, rows: usize, w: &PackedWeights) {
        for_tiles(rows, w, (4, 1), |r, take, p, _| match take {
            4 => tile_vnni256::<4>(&mut tile, r, p, w),
            _ => tile_vnni256::<1>(&mut tile, r, p, w),
        });
    }

    /// AVX2: as [`avx_vnni`] with `vpmaddubsw` + `vpmaddwd` for each 4-product sum.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(mut tile: Tile, rows: usize, w: &PackedWeights) {
        for_tiles(rows, w, (4, 1), |r, take, p, _| match take {
            4 => tile_avx2::<4>(&mut tile, r, p, w),
            _ => tile_avx2::<1>(&mut tile, r, p, w),
        });
    }

    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn tile_vnni256<const R: usize>(tile: &mut Tile, r0: usize, p: usize, w: &PackedWeights) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let panel = w.panel(p);
        let rows = row_starts::<R>(tile, r0);
        for g in 0..tile.k4 / 4 {
            // SAFETY: each panel holds k4 / 4 groups of 64 bytes.
            let b: [__m256i; 2] = std::array::from_fn(|h| unsafe {
                _mm256_loadu_si256(panel.as_ptr().add(g * 64 + 32 * h).cast())
            });
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: g < k4 / 4.
                let a = _mm256_set1_epi32(unsafe { quad(rows[i], g) });
                row[0] = _mm256_dpbusd_avx_epi32(row[0], a, b[0]);
                row[1] = _mm256_dpbusd_avx_epi32(row[1], a, b[1]);
            }
        }
        store_256(tile, r0, p, &acc);
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_avx2<const R: usize>(tile: &mut Tile, r0: usize, p: usize, w: &PackedWeights) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let panel = w.panel(p);
        let ones = _mm256_set1_epi16(1);
        let rows = row_starts::<R>(tile, r0);
        for g in 0..tile.k4 / 4 {
            // SAFETY: each panel holds k4 / 4 groups of 64 bytes.
            let b: [__m256i; 2] = std::array::from_fn(|h| unsafe {
                _mm256_loadu_si256(panel.as_ptr().add(g * 64 + 32 * h).cast())
            });
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: g < k4 / 4.
                let a = _mm256_set1_epi32(unsafe { quad(rows[i], g) });
                for h in 0..2 {
                    // u8 x i8 pairs into i16 (exact: activations are 7-bit), then pairs of
                    // those into i32.
                    let pairs = _mm256_maddubs_epi16(a, b[h]);
                    row[h] = _mm256_add_epi32(row[h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        store_256(tile, r0, p, &acc);
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn store_256<const R: usize>(tile: &mut Tile, r0: usize, p: usize, acc: &[[__m256i; 2]; R]) {
        for (i, row) in acc.iter().enumerate() {
            let at = (r0 + i) * tile.ldc + p * PANEL;
            let out = &mut tile.c[at..at + PANEL];
            // SAFETY: `out` holds 16 values.
            unsafe {
                _mm256_storeu_si256(out.as_mut_ptr().cast(), row[0]);
                _mm256_storeu_si256(out.as_mut_ptr().add(8).cast(), row[1]);
            }
        }
    }
}

/// The affine map of 7-bit activations: `x ~ scale * (q - zero_point)`, `q` in `0..=127`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuant {
    /// Step between codes.
    pub scale: f32,
    /// The code of 0.0.
    pub zero_point: i32,
}

impl ActQuant {
    /// The map covering `[min(lo, 0), max(hi, 0)]` (0.0 is always exact, as padding needs);
    /// an empty or all-zero range gets scale 1.
    pub fn from_range(lo: f32, hi: f32) -> ActQuant {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let span = hi - lo;
        if !(span.is_finite() && span > 0.0) {
            return ActQuant {
                scale: 1.0,
                zero_point: 0,
            };
        }
        let scale = span / ACT_MAX as f32;
        let zero_point = (-lo / scale).round().clamp(0.0, ACT_MAX as f32) as i32;
        ActQuant { scale, zero_point }
    }

    /// The map of `values`' range (dynamic quantization); NaNs are ignored.
    pub fn of(values: &[f32]) -> ActQuant {
        let (lo, hi) = values
            .iter()
            .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        ActQuant::from_range(lo, hi)
    }

    /// The value code `code` stands for: `scale * (code - zero_point)`.
    #[inline(always)]
    pub fn value(&self, code: u8) -> f32 {
        self.scale * (i32::from(code) - self.zero_point) as f32
    }

    /// The range `[lo, hi]` the codes cover (calibration widens ranges with it).
    pub fn range(&self) -> [f32; 2] {
        [self.value(0), self.value(ACT_MAX)]
    }

    /// The code of `x`: `x / scale + zero_point` clamped to `0..=127`, rounded half up (NaN
    /// gives 0). Branch-free and without a `round` call or a saturating cast, so loops of it
    /// vectorise.
    #[inline(always)]
    pub fn code(&self, x: f32) -> u8 {
        // `max` drops a NaN (to 0), so the value is a finite 0.5..=127.5 below.
        let q = (x * (1.0 / self.scale) + self.zero_point as f32)
            .max(0.0)
            .min(ACT_MAX as f32);
        // SAFETY: q + 0.5 is finite and within i32.
        unsafe { (q + 0.5).to_int_unchecked::<i32>() as u8 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (a linear congruential generator, seeded).
    fn bytes(len: usize, seed: u32, lo: i32, hi: i32) -> Vec<i32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                lo + ((s >> 8) % (hi - lo + 1) as u32) as i32
            })
            .collect()
    }

    #[test]
    fn every_kernel_equals_the_definition_exactly() {
        // Shapes with row, column and K tails; extreme values (0/127 against -128/127).
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 10, 9),
            (8, 32, 288),
            (13, 70, 37),
            (64, 128, 3136),
            (70, 16, 4),
        ] {
            let a: Vec<u8> = bytes(m * k, 1 + m as u32, 0, 127)
                .into_iter()
                .map(|v| v as u8)
                .collect();
            let w: Vec<i8> = bytes(n * k, 7 + n as u32, -128, 127)
                .into_iter()
                .map(|v| v as i8)
                .collect();
            let mut extreme = a.clone();
            extreme.iter_mut().step_by(3).for_each(|v| *v = 127);
            for a in [a, extreme] {
                let packed = PackedWeights::new(&w, n, k);
                let (k4, n16) = (packed.k_padded(), packed.n_padded());
                let mut a4 = vec![0u8; m * k4];
                for r in 0..m {
                    a4[r * k4..r * k4 + k].copy_from_slice(&a[r * k..(r + 1) * k]);
                }
                let want: Vec<i32> = (0..m * n)
                    .map(|i| {
                        (0..k)
                            .map(|kk| a[(i / n) * k + kk] as i32 * w[(i % n) * k + kk] as i32)
                            .sum()
                    })
                    .collect();
                for kernel in Int8Kernel::all_supported() {
                    let mut got = vec![0i32; m * n];
                    gemm_u8i8_with(kernel, &a4, m, &packed, (&mut got, n), |c, out| {
                        for (crow, orow) in c.chunks_exact(n16).zip(out.chunks_exact_mut(n)) {
                            orow.copy_from_slice(&crow[..n]);
                        }
                    });
                    assert_eq!(got, want, "{} at {m} x {n} x {k}", kernel.name());
                }
                // The single-thread entry point, with the active kernel.
                let mut c = Vec::new();
                gemm_u8i8_rows(&a4, m, &packed, &mut c);
                let rows: Vec<i32> = c.chunks(n16).flat_map(|r| r[..n].to_vec()).collect();
                assert_eq!(rows, want, "rows at {m} x {n} x {k}");
            }
        }
    }

    #[test]
    fn the_epilogue_writes_every_row_once() {
        let (m, n, k) = (200, 10, 8);
        let packed = PackedWeights::new(&vec![1i8; n * k], n, k);
        let a: Vec<u8> = (0..m * packed.k_padded())
            .map(|i| (i / packed.k_padded() % 3) as u8)
            .collect();
        let mut out = vec![-1i64; m * n];
        gemm_u8i8(&a, m, &packed, &mut out, n, |c, out| {
            for (crow, orow) in c
                .chunks_exact(packed.n_padded())
                .zip(out.chunks_exact_mut(n))
            {
                for (o, v) in orow.iter_mut().enumerate() {
                    *v += 1 + crow[o] as i64;
                }
            }
        });
        let want: Vec<i64> = (0..m * n).map(|i| (i / n % 3) as i64 * 8).collect();
        assert_eq!(out, want);
        assert_eq!(packed.col_sums(), &[8; 10]);
    }

    #[test]
    fn activation_codes_round_clamp_and_keep_zero_exact() {
        let q = ActQuant::from_range(-1.0, 3.0);
        assert_eq!(q.code(0.0) as i32, q.zero_point);
        assert_eq!(q.code(-5.0), 0);
        assert_eq!(q.code(9.0), ACT_MAX);
        assert_eq!(q.code(f32::NAN), 0);
        assert!(
            (q.scale * (q.code(1.0) as i32 - q.zero_point) as f32 - 1.0).abs() <= q.scale / 2.0
        );
        assert_eq!(ActQuant::of(&[0.0, 0.0]).scale, 1.0);
        assert_eq!(ActQuant::of(&[0.5, 2.0]).zero_point, 0);
    }
}
