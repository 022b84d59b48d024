//! 2-D convolution (groups 1, dilation 1, symmetric zero padding, any stride) on contiguous
//! `f32` NCHW slices, forward and backward, as im2col + packed GEMM (the `gemm` crate).
//!
//! Per sample `b`, with `K = C_in * KH * KW` and `N = OH * OW`:
//! - forward: `y_b (C_out x N) = W (C_out x K) @ cols_b (K x N) + bias`;
//! - input gradient: `dcols_b = W^T @ dy_b`, scattered back by col2im;
//! - weight gradient: `dW = sum_b dy_b @ cols_b^T`, bias gradient `sum_b rowsum(dy_b)`.
//!
//! Kernel taps that never reach the input (a 3x3 kernel with padding 1 over a 1x1 plane uses
//! its centre only) are cut before any of these (`TapCrop`): the products they would add are all
//! with zero padding.
//!
//! Burn's generic backward (what Flex runs) computes the weight gradient as a convolution of
//! the batch-transposed input with the batch-transposed output gradient as kernel, and the input
//! gradient as a transposed convolution; both copy whole tensors to swap dimensions and run
//! kernels far larger than the layer's own. The functions here are plain slice code with no
//! kiln or Burn types, so they could move into Flex as its `conv2d_x_backward` /
//! `conv2d_weight_backward`.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use crate::winograd::{self, Pass};

/// The geometry of one 2-D convolution over a batch, NCHW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dShape {
    /// Samples in the batch.
    pub batch: usize,
    /// Input channels.
    pub channels_in: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output channels.
    pub channels_out: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Zero padding on each side, along height and width.
    pub padding: [usize; 2],
}

impl Conv2dShape {
    /// Whether the geometry describes a convolution with at least one output element.
    pub fn is_valid(&self) -> bool {
        let positive = [
            self.batch,
            self.channels_in,
            self.height,
            self.width,
            self.channels_out,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
        ];
        positive.iter().all(|&n| n > 0)
            && self.height + 2 * self.padding[0] >= self.kernel[0]
            && self.width + 2 * self.padding[1] >= self.kernel[1]
    }

    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
    }

    /// Output elements per channel (`N`).
    fn out_plane(&self) -> usize {
        self.out_height() * self.out_width()
    }

    /// Rows of a sample's column matrix (`K`).
    fn patch_len(&self) -> usize {
        self.channels_in * self.kernel[0] * self.kernel[1]
    }

    /// Input elements per sample.
    pub fn input_sample(&self) -> usize {
        self.channels_in * self.height * self.width
    }

    /// Output elements per sample.
    pub fn output_sample(&self) -> usize {
        self.channels_out * self.out_plane()
    }

    /// Elements of the weight tensor.
    pub fn weight_len(&self) -> usize {
        self.channels_out * self.patch_len()
    }

    /// Stride 1 and outputs as wide as the input (a "same" padding): output row `oy` of tap
    /// `(ki, kj)` reads input row `oy + ki - ph` shifted by `kj - pw`, so a band of rows is one
    /// contiguous copy (see `Band`) instead of a copy and two fills per row, which cost more
    /// than the data on short rows (same-process A/B: SimpleCNN's conv2 forward 3.4 vs 3.8 ms,
    /// ResNet's 4x4 and 2x2 layers at batch 32 15-20 % faster, forward and weight gradient).
    fn shifts_whole_rows(&self) -> bool {
        self.stride == [1, 1] && self.out_width() == self.width
    }

    /// A 1x1 convolution with stride 1 and no padding reads the input as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }
}

/// The output positions `o` in `0..out` whose input position `o * stride + k - pad` lies in
/// `0..input`, as a range (empty when there are none).
fn valid_outputs(
    out: usize,
    stride: usize,
    k: usize,
    pad: usize,
    input: usize,
) -> std::ops::Range<usize> {
    // o * stride + k >= pad
    let lo = if pad > k {
        (pad - k).div_ceil(stride)
    } else {
        0
    };
    // o * stride + k - pad <= input - 1
    let hi = if input + pad > k {
        ((input - 1 + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    lo.min(hi)..hi
}

/// For a convolution whose output rows are its input rows shifted
/// ([`Conv2dShape::shifts_whole_rows`]), where one kernel tap's column-matrix row meets the
/// input, as one contiguous block: the valid output rows of a band are a shifted copy of
/// consecutive input rows, apart from the padded columns, where the copy wraps around the row
/// ends.
struct Band {
    /// The valid rows' elements in the band's column-matrix row.
    dst: std::ops::Range<usize>,
    /// The part of `dst` (relative to its start) that lies over the input plane.
    copied: std::ops::Range<usize>,
    /// The input elements that `copied` holds.
    src: std::ops::Range<usize>,
}

impl Band {
    fn new(
        s: &Conv2dShape,
        out_rows: &std::ops::Range<usize>,
        rows_ok: &std::ops::Range<usize>,
        (ki, kj): (usize, usize),
    ) -> Self {
        let w = s.width;
        let lo = rows_ok.start.max(out_rows.start);
        let hi = rows_ok.end.min(out_rows.end).max(lo);
        let dst = (lo - out_rows.start) * w..(hi - out_rows.start) * w;
        if dst.is_empty() {
            return Band {
                dst,
                copied: 0..0,
                src: 0..0,
            };
        }
        // Input element of the block's first position: row lo + ki - ph, column kj - pw (one
        // of them may be -1 in the corner, where the copy starts past the plane's edge).
        let start = ((lo + ki) * w + kj) as isize - (s.padding[0] * w + s.padding[1]) as isize;
        let end = start + dst.len() as isize;
        let plane = (s.height * w) as isize;
        // A valid row lies inside the plane, so the block overhangs it by at most the padding,
        // in padded columns.
        let (first, last) = (start.max(0), end.min(plane));
        Band {
            copied: (first - start) as usize..(last - start) as usize,
            src: first as usize..last as usize,
            dst,
        }
    }
}

/// Column-matrix rows at most this long are made by [`TapRow::Gather`]: on small planes (ResNet's
/// 4x4 and 2x2 maps at 32x32 input) a row is a handful of elements, and its zero fills and block
/// copies cost more than writing the elements one by one.
const GATHER_MAX: usize = 32;

/// One kernel tap's column-matrix row for a band of output rows, in terms of an input plane:
/// the same for every channel, so worked out once per band instead of once per channel and tap
/// (the range arithmetic, divisions included, cost more than the copies on small maps).
struct TapRow {
    /// Per valid output row: where it starts in the row and where its first valid column reads
    /// the plane. The other rows, and the columns outside `cols_ok`, are padding.
    rows: Vec<(usize, usize)>,
    /// The valid output columns.
    cols_ok: std::ops::Range<usize>,
    /// How [`im2col_rows`] writes the row (col2im adds back row by row, or by `Gather` pairs).
    fill: TapFill,
}

/// How [`im2col_rows`] writes a [`TapRow`].
enum TapFill {
    /// The valid `(row position, plane position)` pairs, and the row positions that are
    /// padding (zeroed one by one: a `memset` call per row of a few elements cost more).
    Gather {
        pairs: Vec<(u32, u32)>,
        zeros: Vec<u32>,
    },
    /// Zeros outside `band.dst`, one block copy, and zeros at `wrapped` (positions in the
    /// block: the padded columns the copy wrapped around). Stride-1 "same" convolutions.
    Band { band: Band, wrapped: Vec<usize> },
    /// Zeros, then a copy per valid output row.
    Rows,
}

/// The [`TapRow`]s of all the taps of a kernel, for a band of output rows of one sample, or
/// (gathers only, [`ColumnPlan::for_group`]) for all the output rows of several samples.
struct ColumnPlan {
    taps: Vec<TapRow>,
    /// Elements per column-matrix row (output rows of the band x `OW`, times `samples`).
    n: usize,
    /// Consecutive samples one [`im2col_rows`] call covers: their columns side by side.
    samples: usize,
}

impl ColumnPlan {
    fn new(s: &Conv2dShape, out_rows: std::ops::Range<usize>) -> Self {
        let (oh, ow) = (s.out_height(), s.out_width());
        let n = out_rows.len() * ow;
        let [kh, kw] = s.kernel;
        let taps = (0..kh * kw)
            .map(|tap| {
                let (ki, kj) = (tap / kw, tap % kw);
                let rows_ok = valid_outputs(oh, s.stride[0], ki, s.padding[0], s.height);
                let cols_ok = valid_outputs(ow, s.stride[1], kj, s.padding[1], s.width);
                let lo = rows_ok.start.max(out_rows.start);
                let valid_rows = lo..rows_ok.end.min(out_rows.end).max(lo);
                // Output (oy, ox) reads input (oy * sh + ki - ph, ox * sw + kj - pw).
                let at = |oy: usize, ox: usize| {
                    let iy = oy * s.stride[0] + ki - s.padding[0];
                    iy * s.width + ox * s.stride[1] + kj - s.padding[1]
                };
                let rows = if cols_ok.is_empty() {
                    Vec::new()
                } else {
                    valid_rows
                        .clone()
                        .map(|oy| ((oy - out_rows.start) * ow, at(oy, cols_ok.start)))
                        .collect()
                };
                let fill = if n <= GATHER_MAX {
                    let pairs: Vec<(u32, u32)> = valid_rows
                        .flat_map(|oy| cols_ok.clone().map(move |ox| (oy, ox)))
                        .map(|(oy, ox)| {
                            let d = (oy - out_rows.start) * ow + ox;
                            (d as u32, at(oy, ox) as u32)
                        })
                        .collect();
                    let zeros = (0..n as u32)
                        .filter(|d| !pairs.iter().any(|p| p.0 == *d))
                        .collect();
                    TapFill::Gather { pairs, zeros }
                } else if s.shifts_whole_rows() {
                    let band = Band::new(s, &out_rows, &rows_ok, (ki, kj));
                    let padded = (0..ow).filter(|ox| !cols_ok.contains(ox));
                    let wrapped = (0..band.dst.len() / ow.max(1))
                        .flat_map(|r| padded.clone().map(move |ox| r * ow + ox))
                        .collect();
                    TapFill::Band { band, wrapped }
                } else {
                    TapFill::Rows
                };
                TapRow {
                    rows,
                    cols_ok,
                    fill,
                }
            })
            .collect();
        ColumnPlan {
            taps,
            n,
            samples: 1,
        }
    }

    /// The plan of a group of `samples` consecutive samples: on small planes (gathers), one
    /// plan for the group, so that a column-matrix row is made in one loop over all the samples
    /// instead of one short loop per sample; otherwise the plan of one sample.
    fn for_group(s: &Conv2dShape, samples: usize) -> Self {
        let mut plan = ColumnPlan::new(s, 0..s.out_height());
        let n = plan.n;
        if n > GATHER_MAX || samples == 1 {
            return plan;
        }
        let stride = s.input_sample();
        for tap in &mut plan.taps {
            if let TapFill::Gather { pairs, zeros } = &mut tap.fill {
                let one = std::mem::take(pairs);
                *pairs = (0..samples)
                    .flat_map(|j| {
                        one.iter()
                            .map(move |&(d, from)| (j * n, j * stride, d, from))
                    })
                    .map(|(dj, xj, d, from)| {
                        ((dj + d as usize) as u32, (xj + from as usize) as u32)
                    })
                    .collect();
                let one = std::mem::take(zeros);
                *zeros = (0..samples)
                    .flat_map(|j| one.iter().map(move |&z| (j * n) as u32 + z))
                    .collect();
            }
        }
        plan.n = n * samples;
        plan.samples = samples;
        plan
    }
}

/// Writes sample `x` (`C_in x H x W`; with a group plan, `plan.samples` consecutive samples)
/// as its `K x N` column matrix, row `k` at `cols[k * ld..]`, for the output rows of `plan` (all
/// of them for the whole matrix).
fn im2col_rows(s: &Conv2dShape, plan: &ColumnPlan, x: &[f32], cols: &mut [f32], ld: usize) {
    let (n, ow, sw) = (plan.n, s.out_width(), s.stride[1]);
    let plane = s.height * s.width;
    let taps = plan.taps.len();
    for (t, tap) in plan.taps.iter().enumerate() {
        for c in 0..s.channels_in {
            let row = &mut cols[(c * taps + t) * ld..][..n];
            // A group plan's plane positions run over its samples, from this channel's plane
            // in the first.
            let x_plane = &x[c * plane..];
            match &tap.fill {
                TapFill::Gather { pairs, zeros } => {
                    for &z in zeros {
                        row[z as usize] = 0.0;
                    }
                    for &(d, from) in pairs {
                        row[d as usize] = x_plane[from as usize];
                    }
                }
                TapFill::Band { band, wrapped } => {
                    row[..band.dst.start].fill(0.0);
                    row[band.dst.end..].fill(0.0);
                    let block = &mut row[band.dst.clone()];
                    block[band.copied.clone()].copy_from_slice(&x_plane[band.src.clone()]);
                    for &z in wrapped {
                        block[z] = 0.0;
                    }
                }
                TapFill::Rows => {
                    row.fill(0.0);
                    for &(at, from) in &tap.rows {
                        let dst = &mut row[at..at + ow][tap.cols_ok.clone()];
                        if sw == 1 {
                            dst.copy_from_slice(&x_plane[from..from + dst.len()]);
                        } else {
                            let strided = x_plane[from..].iter().step_by(sw);
                            for (d, &v) in dst.iter_mut().zip(strided) {
                                *d = v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds the `K x N` column matrix `cols` (row `k` at `cols[k * ld..]`) of the output rows of
/// `plan` back onto sample `dx` (`C_in x H x W`): the adjoint of [`im2col_rows`].
fn col2im_rows(s: &Conv2dShape, plan: &ColumnPlan, cols: &[f32], ld: usize, dx: &mut [f32]) {
    let (n, ow, sw) = (plan.n, s.out_width(), s.stride[1]);
    let plane = s.height * s.width;
    let taps = plan.taps.len();
    for (t, tap) in plan.taps.iter().enumerate() {
        for c in 0..s.channels_in {
            let row = &cols[(c * taps + t) * ld..][..n];
            let dx_plane = &mut dx[c * plane..];
            if let TapFill::Gather { pairs, .. } = &tap.fill {
                for &(from, d) in pairs {
                    dx_plane[d as usize] += row[from as usize];
                }
                continue;
            }
            for &(at, to) in &tap.rows {
                let src = &row[at..at + ow][tap.cols_ok.clone()];
                if sw == 1 {
                    for (d, v) in dx_plane[to..to + src.len()].iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (i, v) in src.iter().enumerate() {
                        dx_plane[to + i * sw] += v;
                    }
                }
            }
        }
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)`, each matrix given by its row and column
/// strides in elements.
///
/// # Safety-relevant contract
/// The strides and sizes must address elements inside the three slices; every caller passes
/// slices whose lengths are checked against the shape first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        last(m, n, dst_rs, dst_cs) <= dst.len(),
        "matmul: dst too short"
    );
    assert!(
        last(m, k, lhs_rs, lhs_cs) <= lhs.len(),
        "matmul: lhs too short"
    );
    assert!(
        last(k, n, rhs_rs, rhs_cs) <= rhs.len(),
        "matmul: rhs too short"
    );
    // SAFETY: the asserts above keep every addressed element inside its slice; `dst` is borrowed
    // mutably and does not alias `lhs` or `rhs`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Columns per GEMM the kernels aim for: samples are grouped until a group's `samples * N`
/// reaches this, so deep layers with small feature maps (ResNet's 7x7, or 1x1 at 32x32 input)
/// still run GEMMs wide enough to keep the micro-kernel busy.
const TARGET_COLUMNS: usize = 256;

/// How a batch is cut into groups of consecutive samples, and how the groups use the threads.
#[derive(Clone, Copy, Debug)]
struct Grouping {
    /// Samples per group (the last group may have fewer).
    per_group: usize,
    /// Run groups in parallel, one GEMM each on one thread (`None`), or one after the other
    /// with each GEMM spread over the threads.
    gemm_threads: Option<Parallelism>,
}

impl Grouping {
    fn new(s: &Conv2dShape) -> Self {
        let groups = (s.batch * s.out_plane() / TARGET_COLUMNS).clamp(1, s.batch);
        let per_group = s.batch.div_ceil(groups);
        let groups = s.batch.div_ceil(per_group);
        let threads = rayon::current_num_threads();
        let gemm_threads = (groups < threads && threads > 1).then_some(Parallelism::Rayon(threads));
        Grouping {
            per_group,
            gemm_threads,
        }
    }

    fn parallelism(&self) -> Parallelism {
        self.gemm_threads.unwrap_or(Parallelism::None)
    }

    /// Runs `group(scratch, src_group, dst_group)` over the matching groups of `dst` and `src`
    /// (`(slice, elements per group)`): in parallel across groups, or one group after the other
    /// (each GEMM then spread over the threads), with the running thread's scratch.
    fn for_each(
        &self,
        (dst, per_dst): (&mut [f32], usize),
        (src, per_src): (&[f32], usize),
        group: impl Fn(&mut Scratch, &[f32], &mut [f32]) + Sync,
    ) {
        match self.gemm_threads {
            None => dst
                .par_chunks_mut(per_dst)
                .zip(src.par_chunks(per_src))
                .for_each(|(d, s)| with_scratch(|scratch| group(scratch, s, d))),
            Some(_) => with_scratch(|scratch| {
                for (d, s) in dst.chunks_mut(per_dst).zip(src.chunks(per_src)) {
                    group(scratch, s, d);
                }
            }),
        }
    }
}

/// Copies the per-sample `C_out x N` blocks of `samples` (`[samples, C_out, N]`) side by side
/// into `wide` (`C_out x samples*N`).
fn gather_channels(samples: &[f32], channels: usize, n: usize, wide: &mut [f32]) {
    let count = samples.len() / (channels * n);
    let width = count * n;
    for (j, sample) in samples.chunks_exact(channels * n).enumerate() {
        for (c, row) in sample.chunks_exact(n).enumerate() {
            wide[c * width + j * n..][..n].copy_from_slice(row);
        }
    }
}

/// The inverse of [`gather_channels`], adding `bias[c]` to channel `c` on the way.
fn scatter_channels(
    wide: &[f32],
    channels: usize,
    n: usize,
    bias: Option<&[f32]>,
    samples: &mut [f32],
) {
    let count = samples.len() / (channels * n);
    let width = count * n;
    for (j, sample) in samples.chunks_exact_mut(channels * n).enumerate() {
        for (c, row) in sample.chunks_exact_mut(n).enumerate() {
            let src = &wide[c * width + j * n..][..n];
            match bias {
                Some(bias) => {
                    for (d, v) in row.iter_mut().zip(src) {
                        *d = v + bias[c];
                    }
                }
                None => row.copy_from_slice(src),
            }
        }
    }
}

/// The first `len` elements of a scratch buffer. A shorter buffer is grown (zero-filled); a
/// longer one is not shrunk, so that a larger call after a smaller one does not zero-fill it
/// again: every caller writes the elements before it reads them.
pub(crate) fn scratch_slice(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The column matrix (`K x samples*N`) of a group of samples `x` (`[samples, C_in, H, W]`): the
/// input itself for one sample of a pointwise convolution, else built in `cols`.
fn group_columns<'a>(s: &Conv2dShape, x: &'a [f32], cols: &'a mut Vec<f32>) -> &'a [f32] {
    let count = x.len() / s.input_sample();
    if count == 1 && s.is_pointwise() {
        return x;
    }
    let (k, n) = (s.patch_len(), s.out_plane());
    let width = count * n;
    let cols = scratch_slice(cols, k * width);
    let plan = ColumnPlan::for_group(s, count);
    for (j, xg) in x.chunks_exact(plan.samples * s.input_sample()).enumerate() {
        im2col_rows(s, &plan, xg, &mut cols[j * plan.n..], width);
    }
    cols
}

/// Column-matrix floats a band of output rows aims for (1 MiB): a whole sample's columns
/// (ResNet's stem at 224x224: 147 x 12544, 7 MiB) left the caches before the GEMM read them.
/// Measured A/B in one process: the stem's forward pass 10 % faster (29.0 vs 32.5 ms at batch
/// 8), its weight gradient 3 %, the other layers unchanged.
const BAND_FLOATS: usize = 1 << 18;

/// The output rows of one sample cut into bands whose columns fit [`BAND_FLOATS`] (at least one
/// row each).
fn row_bands(s: &Conv2dShape) -> impl Iterator<Item = std::ops::Range<usize>> {
    let oh = s.out_height();
    let per_band = (BAND_FLOATS / (s.patch_len() * s.out_width())).clamp(1, oh);
    (0..oh)
        .step_by(per_band)
        .map(move |start| start..(start + per_band).min(oh))
}

/// The [`ColumnPlan`]s of the bands of [`row_bands`] (for one sample at a time), made on first
/// use and then shared by the parallel groups of a call: a call whose groups all hold several
/// samples never makes them.
struct BandPlans<'a> {
    s: &'a Conv2dShape,
    plans: std::sync::OnceLock<Vec<(std::ops::Range<usize>, ColumnPlan)>>,
}

impl<'a> BandPlans<'a> {
    fn new(s: &'a Conv2dShape) -> Self {
        Self {
            s,
            plans: std::sync::OnceLock::new(),
        }
    }

    fn get(&self) -> &[(std::ops::Range<usize>, ColumnPlan)] {
        self.plans.get_or_init(|| {
            row_bands(self.s)
                .map(|r| (r.clone(), ColumnPlan::new(self.s, r)))
                .collect()
        })
    }
}

/// The output gradient of a group of samples as one `C_out x samples*N` matrix: the samples'
/// own block for one sample, else gathered into `wide`.
fn group_grad<'a>(s: &Conv2dShape, grad: &'a [f32], wide: &'a mut Vec<f32>) -> &'a [f32] {
    let count = grad.len() / s.output_sample();
    if count == 1 {
        return grad;
    }
    let n = s.out_plane();
    let wide = scratch_slice(wide, s.channels_out * count * n);
    gather_channels(grad, s.channels_out, n, wide);
    wide
}

fn check_lengths(s: &Conv2dShape, x: usize, weight: usize, out: usize) {
    assert!(s.is_valid(), "invalid convolution geometry {s:?}");
    assert_eq!(x, s.batch * s.input_sample(), "input length");
    assert_eq!(weight, s.weight_len(), "weight length");
    assert_eq!(out, s.batch * s.output_sample(), "output length");
}

/// Scratch buffers of one thread.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Column matrices (im2col), or transformed inputs (Winograd).
    pub(crate) cols: Vec<f32>,
    /// Gathered output gradients (im2col), or products (Winograd).
    pub(crate) wide: Vec<f32>,
    /// Padded input rows and partial transforms (Winograd).
    pub(crate) band: Vec<f32>,
}

thread_local! {
    /// Each thread's scratch, kept between calls: the column matrices are megabytes, and
    /// allocating (and zero-filling) them per call cost more than the copies that fill them.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's scratch buffers.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        // Re-entered on this thread (a GEMM's worker running another group): fresh buffers.
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The taps of a kernel that touch the input for at least one output position, when they are
/// fewer than the whole kernel: a 3x3 kernel with padding 1 over a 1x1 plane (ResNet's layer4 at
/// 32x32 input) reads the input with its centre tap only, so im2col would multiply 8 rows of
/// zeros for every row of data. The convolution is then the same as one with the kernel cut to
/// those taps and the padding reduced to match, which computes no product that is not already in
/// the full one (the skipped taps only ever multiply zero padding).
#[derive(Clone, Debug, PartialEq, Eq)]
struct TapCrop {
    /// The convolution with the cut kernel; same input and output sizes.
    shape: Conv2dShape,
    /// The kept taps along height and width, in the full kernel.
    taps: [std::ops::Range<usize>; 2],
}

impl TapCrop {
    /// The crop of `s`, or `None` when every tap reads the input somewhere.
    fn of(s: &Conv2dShape) -> Option<Self> {
        let (outs, inputs) = ([s.out_height(), s.out_width()], [s.height, s.width]);
        let taps: [std::ops::Range<usize>; 2] = std::array::from_fn(|d| {
            let used = |t: &usize| {
                !valid_outputs(outs[d], s.stride[d], *t, s.padding[d], inputs[d]).is_empty()
            };
            let first = (0..s.kernel[d]).find(used).unwrap_or(0);
            let last = (0..s.kernel[d]).rev().find(used).unwrap_or(0);
            first..last + 1
        });
        if taps[0].len() == s.kernel[0] && taps[1].len() == s.kernel[1] {
            return None;
        }
        // Tap `t` of the cut kernel is tap `t + first` of the full one: the input position
        // `o * stride + t + first - pad` is unchanged with the padding reduced by `first`.
        if taps[0].start > s.padding[0] || taps[1].start > s.padding[1] {
            return None;
        }
        let shape = Conv2dShape {
            kernel: [taps[0].len(), taps[1].len()],
            padding: [s.padding[0] - taps[0].start, s.padding[1] - taps[1].start],
            ..*s
        };
        let same_outputs = shape.is_valid()
            && shape.out_height() == s.out_height()
            && shape.out_width() == s.out_width();
        same_outputs.then_some(TapCrop { shape, taps })
    }

    /// The kept taps of `weight` (`C_out x C_in x KH x KW` in the full shape `s`).
    fn cut(&self, s: &Conv2dShape, weight: &[f32]) -> Vec<f32> {
        let [kh, kw] = s.kernel;
        let [rows, cols] = self.taps.clone();
        let kept = rows.len() * cols.len();
        let mut cut = vec![0.0; self.shape.weight_len()];
        // One output channel's filters per task: a 512-channel layer reads 9 MB here.
        cut.par_chunks_mut(s.channels_in * kept)
            .zip(weight.par_chunks(s.channels_in * kh * kw))
            .for_each(|(dst, src)| {
                for (d, filter) in dst.chunks_exact_mut(kept).zip(src.chunks_exact(kh * kw)) {
                    let mut d = d.iter_mut();
                    for ki in rows.clone() {
                        for kj in cols.clone() {
                            if let Some(d) = d.next() {
                                *d = filter[ki * kw + kj];
                            }
                        }
                    }
                }
            });
        cut
    }

    /// Writes the cut kernel's `grad` into the full shape's `grad_weight`, zeros at the skipped
    /// taps (they never meet the input, so their gradient is exactly zero). The zeros are one
    /// fill (a `memset`) and the kept taps a scatter: ResNet's layer4 at 32x32 input keeps 1 tap
    /// of 9, and a select per element of its 9 MB gradient cost more than the GEMM before it.
    fn uncut(&self, s: &Conv2dShape, grad: &[f32], grad_weight: &mut [f32]) {
        let [kh, kw] = s.kernel;
        let [rows, cols] = self.taps.clone();
        let kept = rows.len() * cols.len();
        // Where each tap of the cut kernel is in the full one.
        let targets: Vec<usize> = rows
            .flat_map(|ki| cols.clone().map(move |kj| ki * kw + kj))
            .collect();
        grad_weight
            .par_chunks_mut(s.channels_in * kh * kw)
            .zip(grad.par_chunks(s.channels_in * kept))
            .for_each(|(dst, src)| {
                dst.fill(0.0);
                for (full, cut) in dst.chunks_exact_mut(kh * kw).zip(src.chunks_exact(kept)) {
                    for (&at, &v) in targets.iter().zip(cut) {
                        full[at] = v;
                    }
                }
            });
    }
}

/// Forward convolution: `out` (`B x C_out x OH x OW`) from `x` (`B x C_in x H x W`), `weight`
/// (`C_out x C_in x KH x KW`) and an optional `bias` (`C_out`).
pub fn conv2d_forward(
    s: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    conv2d_forward_cut(s, x, weight, None, bias, out);
}

/// The kernel [`conv2d_forward`] and [`conv2d_backward_input`] run a convolution of shape `s`
/// with when some of its taps never reach the input (a 3x3 kernel over a 1x1 plane keeps its
/// centre tap): `weight` cut to the taps that do, or `None` when every tap is used. A caller
/// that runs the same weight on many batches can cut it once and pass it to
/// [`conv2d_forward_cut`] / [`conv2d_backward_input_cut`].
pub fn cut_kernel(s: &Conv2dShape, weight: &[f32]) -> Option<Vec<f32>> {
    assert_eq!(weight.len(), s.weight_len(), "weight length");
    TapCrop::of(s).map(|crop| crop.cut(s, weight))
}

/// The cut kernel `cut` if given (from [`cut_kernel`] of the same shape and weight), else
/// `crop`'s cut of `weight` made now.
fn cut_or_make<'a>(
    crop: &TapCrop,
    s: &Conv2dShape,
    weight: &[f32],
    cut: Option<&'a [f32]>,
) -> std::borrow::Cow<'a, [f32]> {
    match cut {
        Some(cut) => {
            assert_eq!(cut.len(), crop.shape.weight_len(), "cut kernel length");
            std::borrow::Cow::Borrowed(cut)
        }
        None => std::borrow::Cow::Owned(crop.cut(s, weight)),
    }
}

/// [`conv2d_forward`] with `cut`, the weight's [`cut_kernel`] for `s` made beforehand (ignored
/// when `s` cuts no taps; made here when `None`).
pub fn conv2d_forward_cut(
    s: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    cut: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    check_lengths(s, x.len(), weight.len(), out.len());
    if let Some(bias) = bias {
        assert_eq!(bias.len(), s.channels_out, "bias length");
    }
    if let Some(crop) = TapCrop::of(s) {
        let cut = cut_or_make(&crop, s, weight, cut);
        conv2d_forward(&crop.shape, x, &cut, bias, out);
    } else if winograd::applies(s, Pass::Forward) {
        winograd::forward(s, x, weight, bias, out);
    } else {
        im2col_forward(s, x, weight, bias, out);
    }
}

/// [`conv2d_forward`] as im2col + GEMM, for any shape.
pub(crate) fn im2col_forward(
    s: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (k, n) = (s.patch_len(), s.out_plane());
    let grouping = Grouping::new(s);
    let bands = BandPlans::new(s);
    let group = |scratch: &mut Scratch, xg: &[f32], og: &mut [f32]| {
        let count = xg.len() / s.input_sample();
        let width = count * n;
        let par = grouping.parallelism();
        if count == 1 {
            match bias {
                Some(bias) => {
                    for (row, &b) in og.chunks_exact_mut(n).zip(bias) {
                        row.fill(b);
                    }
                }
                None => og.fill(0.0),
            }
            if s.is_pointwise() {
                let dims = (s.channels_out, n, k);
                matmul(dims, og, (n, 1), true, weight, (k, 1), xg, (n, 1), par);
                return;
            }
            // One band of output rows at a time, so that its columns stay in the cache
            // between im2col writing them and the GEMM reading them.
            for (rows, plan) in bands.get() {
                let width = rows.len() * s.out_width();
                let cols = scratch_slice(&mut scratch.cols, k * width);
                im2col_rows(s, plan, xg, cols, width);
                let dst = &mut og[rows.start * s.out_width()..];
                let dims = (s.channels_out, width, k);
                matmul(
                    dims,
                    dst,
                    (n, 1),
                    true,
                    weight,
                    (k, 1),
                    cols,
                    (width, 1),
                    par,
                );
            }
        } else {
            let cols = group_columns(s, xg, &mut scratch.cols);
            let dims = (s.channels_out, width, k);
            let wide = scratch_slice(&mut scratch.wide, s.channels_out * width);
            matmul(
                dims,
                wide,
                (width, 1),
                false,
                weight,
                (k, 1),
                cols,
                (width, 1),
                par,
            );
            scatter_channels(wide, s.channels_out, n, bias, og);
        }
    };
    let per_in = grouping.per_group * s.input_sample();
    let per_out = grouping.per_group * s.output_sample();
    grouping.for_each((out, per_out), (x, per_in), group);
}

/// Gradient of the convolution with respect to its input (`B x C_in x H x W`) from `weight` and
/// `grad_out` (`B x C_out x OH x OW`), added to `grad_x` (pass zeros, e.g. a fresh
/// `vec![0.0; n]`, for the gradient itself: a fresh zeroed allocation costs no extra pass).
pub fn conv2d_backward_input(
    s: &Conv2dShape,
    weight: &[f32],
    grad_out: &[f32],
    grad_x: &mut [f32],
) {
    conv2d_backward_input_cut(s, weight, None, grad_out, grad_x);
}

/// [`conv2d_backward_input`] with `cut`, the weight's [`cut_kernel`] for `s` made beforehand
/// (ignored when `s` cuts no taps; made here when `None`).
pub fn conv2d_backward_input_cut(
    s: &Conv2dShape,
    weight: &[f32],
    cut: Option<&[f32]>,
    grad_out: &[f32],
    grad_x: &mut [f32],
) {
    check_lengths(s, grad_x.len(), weight.len(), grad_out.len());
    if let Some(crop) = TapCrop::of(s) {
        let cut = cut_or_make(&crop, s, weight, cut);
        conv2d_backward_input(&crop.shape, &cut, grad_out, grad_x);
    } else if winograd::applies(s, Pass::InputGradient) {
        winograd::backward_input(s, weight, grad_out, grad_x);
    } else {
        im2col_backward_input(s, weight, grad_out, grad_x);
    }
}

/// [`conv2d_backward_input`] as GEMM + col2im, for any shape.
pub(crate) fn im2col_backward_input(
    s: &Conv2dShape,
    weight: &[f32],
    grad_out: &[f32],
    grad_x: &mut [f32],
) {
    let (k, n) = (s.patch_len(), s.out_plane());
    let grouping = Grouping::new(s);
    let bands = BandPlans::new(s);
    // The whole-sample plan of groups of several samples, also made once per call.
    let whole = std::sync::OnceLock::new();
    let par = grouping.parallelism();
    // dcols (K x width) = W^T (K x C_out: row stride 1, column stride K) @ a C_out x width
    // gradient block whose rows are `ld` apart.
    let transposed = |dcols: &mut [f32], grad: &[f32], ld: usize, width: usize| {
        let dims = (k, width, s.channels_out);
        matmul(
            dims,
            dcols,
            (width, 1),
            false,
            weight,
            (1, k),
            grad,
            (ld, 1),
            par,
        );
    };
    let group = |scratch: &mut Scratch, gg: &[f32], dxg: &mut [f32]| {
        let count = gg.len() / s.output_sample();
        if count == 1 && s.is_pointwise() {
            let dims = (k, n, s.channels_out);
            matmul(dims, dxg, (n, 1), true, weight, (1, k), gg, (n, 1), par);
        } else if count == 1 {
            // One band of output rows at a time (see `row_bands`), added back as it is made.
            for (rows, plan) in bands.get() {
                let width = rows.len() * s.out_width();
                let dcols = scratch_slice(&mut scratch.cols, k * width);
                transposed(dcols, &gg[rows.start * s.out_width()..], n, width);
                col2im_rows(s, plan, dcols, width, dxg);
            }
        } else {
            let width = count * n;
            let grad = group_grad(s, gg, &mut scratch.wide);
            let dcols = scratch_slice(&mut scratch.cols, k * width);
            transposed(dcols, grad, width, width);
            // Sample by sample: a group plan's scatter over all the samples' planes (4 KiB
            // apart on ResNet's 2x2 maps) thrashed the L1 sets, twice as slow as this.
            let plan = whole.get_or_init(|| ColumnPlan::new(s, 0..s.out_height()));
            for (j, dxb) in dxg.chunks_exact_mut(s.input_sample()).enumerate() {
                col2im_rows(s, plan, &dcols[j * n..], width, dxb);
            }
        }
    };
    let per_in = grouping.per_group * s.input_sample();
    let per_out = grouping.per_group * s.output_sample();
    grouping.for_each((grad_x, per_in), (grad_out, per_out), group);
}

/// Gradients of the convolution with respect to its weight (`C_out x C_in x KH x KW`) and bias
/// (`C_out`), from the input `x` and `grad_out`. Overwrites `grad_weight` and `grad_bias`.
pub fn conv2d_backward_weight(
    s: &Conv2dShape,
    x: &[f32],
    grad_out: &[f32],
    grad_weight: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) {
    check_lengths(s, x.len(), grad_weight.len(), grad_out.len());
    if let Some(crop) = TapCrop::of(s) {
        let mut cut = vec![0.0; crop.shape.weight_len()];
        conv2d_backward_weight(&crop.shape, x, grad_out, &mut cut, None);
        crop.uncut(s, &cut, grad_weight);
    } else if winograd::applies(s, Pass::WeightGradient) {
        winograd::backward_weight(s, x, grad_out, grad_weight);
    } else {
        im2col_backward_weight(s, x, grad_out, grad_weight);
    }
    if let Some(grad_bias) = grad_bias {
        conv2d_backward_bias(s, grad_out, grad_bias);
    }
}

/// The bias gradient of a convolution: `grad_out` summed over samples and positions, one value
/// per output channel (overwrites `grad_bias`).
pub fn conv2d_backward_bias(s: &Conv2dShape, grad_out: &[f32], grad_bias: &mut [f32]) {
    assert_eq!(grad_bias.len(), s.channels_out, "bias length");
    let n = s.out_plane();
    grad_bias.fill(0.0);
    for gb in grad_out.chunks_exact(s.output_sample()) {
        for (g, row) in grad_bias.iter_mut().zip(gb.chunks_exact(n)) {
            *g += lane_sum(row);
        }
    }
}

/// The sum of `values` in 16 interleaved partial sums (lane `i` adds elements `i`, `i + 16`, ...)
/// added pairwise at the end: vectorised on every CPU, and the same bits on every CPU, unlike
/// one running sum (a chain of dependent adds).
pub(crate) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    for (l, v) in lanes.iter_mut().zip(rest) {
        *l += v;
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

/// The weight gradient of [`conv2d_backward_weight`] as im2col + GEMM, for any shape.
pub(crate) fn im2col_backward_weight(
    s: &Conv2dShape,
    x: &[f32],
    grad_out: &[f32],
    grad_weight: &mut [f32],
) {
    let (k, n) = (s.patch_len(), s.out_plane());
    let w_len = s.weight_len();
    let grouping = Grouping::new(s);
    let bands = BandPlans::new(s);
    let per_in = grouping.per_group * s.input_sample();
    let per_out = grouping.per_group * s.output_sample();
    // dW (C_out x K) += dy_g (C_out x width) @ cols_g^T (width x K); cols_g^T has row stride 1
    // and column stride width.
    let accumulate = |groups: std::ops::Range<usize>, dw: &mut [f32]| {
        with_scratch(|scratch| {
            let par = grouping.parallelism();
            let mut first = true;
            for g in groups {
                let xg = &x[g * per_in..((g + 1) * per_in).min(x.len())];
                let gg = &grad_out[g * per_out..((g + 1) * per_out).min(grad_out.len())];
                let count = gg.len() / s.output_sample();
                if count == 1 && !s.is_pointwise() {
                    // One band of output rows at a time (see `row_bands`); the sample's
                    // gradient block is the band's `C_out x width` matrix with row stride N.
                    for (rows, plan) in bands.get() {
                        let width = rows.len() * s.out_width();
                        let cols = scratch_slice(&mut scratch.cols, k * width);
                        im2col_rows(s, plan, xg, cols, width);
                        let grad = &gg[rows.start * s.out_width()..];
                        let dims = (s.channels_out, k, width);
                        matmul(
                            dims,
                            dw,
                            (k, 1),
                            !first,
                            grad,
                            (n, 1),
                            cols,
                            (1, width),
                            par,
                        );
                        first = false;
                    }
                    continue;
                }
                let width = count * n;
                let grad = group_grad(s, gg, &mut scratch.wide);
                let cols = group_columns(s, xg, &mut scratch.cols);
                let dims = (s.channels_out, k, width);
                let accumulate = !first;
                first = false;
                matmul(
                    dims,
                    dw,
                    (k, 1),
                    accumulate,
                    grad,
                    (width, 1),
                    cols,
                    (1, width),
                    par,
                );
            }
        })
    };
    let groups = s.batch.div_ceil(grouping.per_group);
    match grouping.gemm_threads {
        None => {
            // Contiguous runs of groups per thread, each into its own partial sum.
            let threads = rayon::current_num_threads().min(groups);
            let per = groups.div_ceil(threads);
            let mut partials = vec![0.0f32; threads * w_len];
            partials
                .par_chunks_mut(w_len)
                .enumerate()
                .for_each(|(t, dw)| {
                    let mine = t * per..((t + 1) * per).min(groups);
                    if mine.is_empty() {
                        dw.fill(0.0);
                    } else {
                        accumulate(mine, dw);
                    }
                });
            grad_weight.copy_from_slice(&partials[..w_len]);
            for partial in partials[w_len..].chunks_exact(w_len) {
                for (g, p) in grad_weight.iter_mut().zip(partial) {
                    *g += p;
                }
            }
        }
        Some(_) => accumulate(0..groups, grad_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    #[test]
    fn lane_sums_are_exact_on_integers_and_keep_nan() {
        for len in [0, 1, 15, 16, 17, 100, 1000] {
            let v: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let exact: i64 = (0..len).map(|i| ((i * 37) % 11) as i64 - 5).sum();
            assert_eq!(lane_sum(&v), exact as f32, "length {len}");
        }
        let mut v = vec![1.0; 40];
        v[33] = f32::NAN;
        assert!(lane_sum(&v).is_nan());
    }

    /// Direct definition of the convolution, the independent reference for the GEMM paths.
    fn naive_forward(s: &Conv2dShape, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let (oh, ow) = (s.out_height(), s.out_width());
        let mut out = vec![0.0; s.batch * s.output_sample()];
        for b in 0..s.batch {
            for co in 0..s.channels_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.channels_in {
                            for ki in 0..s.kernel[0] {
                                for kj in 0..s.kernel[1] {
                                    let iy =
                                        (oy * s.stride[0] + ki) as isize - s.padding[0] as isize;
                                    let ix =
                                        (ox * s.stride[1] + kj) as isize - s.padding[1] as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= s.height as isize
                                        || ix >= s.width as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.channels_in + ci) * s.height + iy as usize)
                                        * s.width
                                        + ix as usize];
                                    let wv = w[((co * s.channels_in + ci) * s.kernel[0] + ki)
                                        * s.kernel[1]
                                        + kj];
                                    acc += (xv * wv) as f64;
                                }
                            }
                        }
                        out[((b * s.channels_out + co) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn shapes() -> Vec<Conv2dShape> {
        let mut all = Vec::new();
        for (batch, cin, h, w, cout, k, stride, pad) in [
            (1, 1, 5, 5, 1, [3, 3], [1, 1], [1, 1]),
            (2, 3, 7, 6, 4, [3, 3], [2, 2], [1, 1]),
            (3, 2, 9, 9, 5, [3, 2], [1, 2], [0, 1]),
            (5, 4, 4, 4, 3, [1, 1], [1, 1], [0, 0]),
            (2, 4, 7, 7, 6, [1, 1], [2, 2], [0, 0]),
            (4, 3, 11, 10, 2, [7, 7], [2, 2], [3, 3]),
            (1, 2, 2, 3, 2, [5, 5], [1, 1], [2, 2]),
            // Planes of 400: one sample per group, groups in parallel.
            (4, 2, 20, 20, 3, [3, 3], [1, 1], [1, 1]),
            (3, 3, 20, 20, 2, [1, 1], [1, 1], [0, 0]),
            // 1x1 planes (ResNet's layer4 at 32x32 input): the whole batch in one GEMM, the
            // kernel cut to its centre tap; a stride-2 3x3 from 2x2 to 1x1 (layer4's first
            // convolution there) keeps 2x2 taps; a 3x3 over a 1x4 plane cuts rows only.
            (6, 4, 1, 1, 5, [3, 3], [1, 1], [1, 1]),
            (3, 5, 2, 2, 4, [3, 3], [2, 2], [1, 1]),
            (2, 3, 1, 4, 2, [3, 3], [1, 1], [1, 1]),
            // Winograd's shapes: stride-1 3x3; odd sizes, padding 0, 1 and 2, 1x1 planes, and
            // (the last two) enough channels and tiles to take the Winograd path in the
            // dispatch, in chunks in parallel.
            (2, 16, 9, 7, 17, [3, 3], [1, 1], [1, 1]),
            (1, 16, 5, 6, 16, [3, 3], [1, 1], [0, 0]),
            (3, 17, 4, 3, 16, [3, 3], [1, 1], [2, 2]),
            (2, 16, 1, 1, 18, [3, 3], [1, 1], [1, 1]),
            (5, 64, 16, 13, 64, [3, 3], [1, 1], [1, 1]),
            // Planes whose column matrix takes several bands of output rows: 3x3 over 64x64
            // (3 bands) and a 7x7 stride-2 stem (2 bands, the last shorter).
            (1, 16, 64, 64, 4, [3, 3], [1, 1], [1, 1]),
            (2, 3, 100, 90, 8, [7, 7], [2, 2], [3, 3]),
            // Winograd for the forward pass and the input gradient, im2col for the weight
            // gradient (ResNet's layer4 at 7x7: narrow outputs take Winograd with 256
            // channels or more).
            (8, 256, 7, 7, 256, [3, 3], [1, 1], [1, 1]),
            // Rows of more than GATHER_MAX elements copied row by row at stride 1 (outputs
            // narrower than the input).
            (2, 3, 10, 9, 4, [2, 2], [1, 1], [0, 0]),
        ] {
            all.push(Conv2dShape {
                batch,
                channels_in: cin,
                height: h,
                width: w,
                channels_out: cout,
                kernel: k,
                stride,
                padding: pad,
            });
        }
        all
    }

    /// The shapes above exercise both convolution paths through the dispatch.
    #[test]
    fn shapes_cover_winograd_and_im2col() {
        let winograd = |pass| {
            shapes()
                .iter()
                .filter(|s| winograd::applies(s, pass))
                .count()
        };
        let bands: Vec<usize> = shapes().iter().map(|s| row_bands(s).count()).collect();
        assert!(
            bands.contains(&3) && bands.contains(&2),
            "banded shapes: {bands:?}"
        );
        // Every way im2col makes a row: gathered, as a shifted band, row by row at stride 1
        // and at stride 2.
        let fills: Vec<(u8, usize)> = shapes()
            .iter()
            .flat_map(|s| {
                ColumnPlan::new(s, 0..s.out_height())
                    .taps
                    .into_iter()
                    .map(|t| match t.fill {
                        TapFill::Gather { .. } => (0, 0),
                        TapFill::Band { .. } => (1, 0),
                        TapFill::Rows => (2, s.stride[1]),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for fill in [(0, 0), (1, 0), (2, 1), (2, 2)] {
            assert!(fills.contains(&fill), "no row made as {fill:?}");
        }
        assert_eq!(winograd(Pass::Forward), 2);
        assert_eq!(winograd(Pass::InputGradient), 2);
        assert_eq!(winograd(Pass::WeightGradient), 1);
        assert_eq!(
            shapes().iter().filter(|s| winograd::supports(s)).count(),
            11
        );
    }

    /// Winograd and im2col give the same forward, input and weight gradients on every shape Winograd
    /// can compute, including those where it is not worth it.
    #[test]
    fn winograd_matches_im2col() {
        for (i, s) in shapes().into_iter().enumerate() {
            if !winograd::supports(&s) {
                continue;
            }
            let x = values(s.batch * s.input_sample(), i as u32);
            let w = values(s.weight_len(), 100 + i as u32);
            let bias = values(s.channels_out, 200 + i as u32);
            let g = values(s.batch * s.output_sample(), 300 + i as u32);
            let mut want = vec![0.0; g.len()];
            im2col_forward(&s, &x, &w, Some(&bias), &mut want);
            let mut got = vec![0.0; g.len()];
            winograd::forward(&s, &x, &w, Some(&bias), &mut got);
            let close = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0))
            };
            assert!(close(&got, &want), "forward {s:?}");
            // The input gradient is added to what the buffer holds.
            let mut want = vec![0.5; x.len()];
            im2col_backward_input(&s, &w, &g, &mut want);
            let mut got = vec![0.5; x.len()];
            winograd::backward_input(&s, &w, &g, &mut got);
            assert!(close(&got, &want), "input gradient {s:?}");
            let mut want = vec![f32::NAN; w.len()];
            im2col_backward_weight(&s, &x, &g, &mut want);
            let mut got = vec![f32::NAN; w.len()];
            winograd::backward_weight(&s, &x, &g, &mut got);
            assert!(close(&got, &want), "weight gradient {s:?}");
        }
    }

    /// The cut kernel computes what the full one does, and leaves zero gradient at the taps it
    /// skips; the cuts are the expected ones.
    #[test]
    fn tap_crop_matches_the_full_kernel() {
        let cropped: Vec<(Conv2dShape, TapCrop)> = shapes()
            .into_iter()
            .filter_map(|s| TapCrop::of(&s).map(|c| (s, c)))
            .collect();
        let taps: Vec<_> = cropped.iter().map(|(_, c)| c.taps.clone()).collect();
        assert_eq!(
            taps,
            vec![
                [1..4, 0..5],
                [1..2, 1..2],
                [1..3, 1..3],
                [1..2, 0..3],
                [1..2, 1..2]
            ]
        );
        for (i, (s, crop)) in cropped.iter().enumerate() {
            assert_eq!(crop.shape.out_height(), s.out_height());
            let x = values(s.batch * s.input_sample(), i as u32);
            let w = values(s.weight_len(), 100 + i as u32);
            let bias = values(s.channels_out, 200 + i as u32);
            let g = values(s.batch * s.output_sample(), 300 + i as u32);
            let close = |a: &[f32], b: &[f32]| {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5)
            };
            let (mut want, mut got) = (vec![0.0; g.len()], vec![0.0; g.len()]);
            im2col_forward(s, &x, &w, Some(&bias), &mut want);
            conv2d_forward(s, &x, &w, Some(&bias), &mut got);
            assert!(close(&got, &want), "forward {s:?}");
            let (mut want, mut got) = (vec![0.5; x.len()], vec![0.5; x.len()]);
            im2col_backward_input(s, &w, &g, &mut want);
            conv2d_backward_input(s, &w, &g, &mut got);
            assert!(close(&got, &want), "input gradient {s:?}");
            let (mut want, mut got) = (vec![f32::NAN; w.len()], vec![f32::NAN; w.len()]);
            im2col_backward_weight(s, &x, &g, &mut want);
            conv2d_backward_weight(s, &x, &g, &mut got, None);
            // im2col's gradient at a skipped tap is a sum of products with zeros: exactly 0.
            assert!(close(&got, &want), "weight gradient {s:?}");
        }
    }

    #[test]
    fn valid_outputs_matches_a_scan() {
        for out in 1..6 {
            for stride in 1..4 {
                for k in 0..4 {
                    for pad in 0..4 {
                        for input in 1..7 {
                            let scan: Vec<usize> = (0..out)
                                .filter(|&o| {
                                    let i = (o * stride + k) as isize - pad as isize;
                                    i >= 0 && i < input as isize
                                })
                                .collect();
                            let range: Vec<usize> =
                                valid_outputs(out, stride, k, pad, input).collect();
                            assert_eq!(range, scan, "{out} {stride} {k} {pad} {input}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for (i, s) in shapes().into_iter().enumerate() {
            let x = values(s.batch * s.input_sample(), i as u32);
            let w = values(s.weight_len(), 100 + i as u32);
            let bias = values(s.channels_out, 200 + i as u32);
            let mut out = vec![0.0; s.batch * s.output_sample()];
            conv2d_forward(&s, &x, &w, Some(&bias), &mut out);
            let expected = naive_forward(&s, &x, &w, &bias);
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-4, "{s:?}: {a} vs {b}");
            }
        }
    }

    /// The backward functions are the adjoints of the forward: for any `x`, `w`, `g`,
    /// `<conv(x, w), g> = <x, dX(w, g)> = <w, dW(x, g)>`, and the bias gradient is `g`'s sum
    /// per channel.
    #[test]
    fn backward_is_the_adjoint_of_forward() {
        for (i, s) in shapes().into_iter().enumerate() {
            let x = values(s.batch * s.input_sample(), i as u32);
            let w = values(s.weight_len(), 100 + i as u32);
            let g = values(s.batch * s.output_sample(), 300 + i as u32);
            let zero_bias = vec![0.0; s.channels_out];
            let y = naive_forward(&s, &x, &w, &zero_bias);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum();
            let yg: f64 = dot(&y, &g);

            let mut dx = vec![0.0; x.len()];
            conv2d_backward_input(&s, &w, &g, &mut dx);
            let xdx: f64 = dot(&x, &dx);
            assert!(
                (yg - xdx).abs() < 1e-3 * yg.abs().max(1.0),
                "{s:?}: {yg} vs {xdx}"
            );

            let mut dw = vec![f32::NAN; w.len()];
            let mut db = vec![f32::NAN; s.channels_out];
            conv2d_backward_weight(&s, &x, &g, &mut dw, Some(&mut db));
            let wdw: f64 = dot(&w, &dw);
            assert!(
                (yg - wdw).abs() < 1e-3 * yg.abs().max(1.0),
                "{s:?}: {yg} vs {wdw}"
            );
            let n = s.out_plane();
            for (co, &got) in db.iter().enumerate() {
                let want: f64 = (0..s.batch)
                    .flat_map(|b| {
                        let start = (b * s.channels_out + co) * n;
                        g[start..start + n].iter().map(|&v| v as f64)
                    })
                    .sum();
                // f32 sums of thousands of terms (4,500 for the stem-like shape) drift from the
                // f64 sum by up to ~1e-4: allow 1e-4 per thousand terms.
                let terms = (s.batch * n) as f64;
                let err = (got as f64 - want).abs();
                assert!(
                    err < 1e-4 * (terms / 1e3).max(1.0),
                    "{s:?} bias {co}: {err}"
                );
            }
        }
    }
}
