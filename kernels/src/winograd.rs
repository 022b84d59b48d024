//! Winograd F(2x2, 3x3) convolution for 3x3 kernels with stride 1 (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016): every 2x2 block of outputs is computed
//! from a 4x4 block of inputs with 16 multiplications per input and output channel pair instead
//! of 36, so the GEMMs do 2.25x less work than im2col's.
//!
//! With `U = G g G^T` (each 3x3 kernel as a 4x4 matrix), `V = B^T d B` (each 4x4 input tile) and
//! `Y = A^T [U . V] A`, the sum over input channels of the element-wise product is, for each of
//! the 16 positions `xi` of the 4x4 matrices, a matrix product
//! `M_xi (C_out x tiles) = U_xi (C_out x C_in) @ V_xi (C_in x tiles)`.
//!
//! The tiles are cut into chunks of whole tile rows; each chunk transforms its inputs, runs the
//! 16 GEMMs and writes its outputs, on one thread (chunks in parallel) or, with fewer tiles than
//! make it worth it, one chunk after the other with each GEMM spread over the threads.
//!
//! The input gradient of such a convolution is itself a stride-1 3x3 convolution of the output
//! gradient (kernels flipped, input and output channels swapped, padding `2 - p`), so it takes
//! the same path (`backward_input`). The weight gradient is computed in the transformed domain
//! (`backward_weight`): `dU_xi = dM_xi @ V_xi^T` with `dM = A dY A^T`, then `dW = G^T dU G`.
//!
//! F(4x4, 3x3) (6x6 tiles, 4x fewer multiplications) was tried: its transforms put errors of
//! 1.2e-4 into sums of 576 products of values in [-1, 1], past the 1e-4 kiln's kernels promise.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::Switch;
use crate::conv::{Conv2dShape, Scratch, matmul, scratch_slice, with_scratch};

/// Fewer channels than this make the 16 GEMMs too thin to pay for the transforms; im2col handles
/// those. Measured (`cargo bench --bench conv_kernels`): SimpleCNN's 32 -> 64 convolution at
/// 14x14 ran its input and weight gradients 0.75x and 0.88x as fast with Winograd; ResNet's
/// 64-channel layers at 56x56 1.5-2.2x faster.
const MIN_CHANNELS: usize = 64;

/// Channels (each side) a layer with outputs narrower than 12 columns needs: see
/// [`wide_or_deep`].
const NARROW_MIN_CHANNELS: usize = 256;

/// Floats of transformed inputs and products one chunk may hold (4 MiB), so that a chunk's
/// working set stays near the caches.
const CHUNK_BUDGET: usize = 1 << 20;

/// Below this many tiles per thread, one chunk after the other with the GEMMs spread over the
/// threads beats one chunk per thread.
const MIN_TILES_PER_THREAD: usize = 64;

/// Positions of the 4x4 transformed tile.
const POSITIONS: usize = 16;

static WINOGRAD: Switch = Switch::new("KILN_WINOGRAD", "off");

/// Whether stride-1 3x3 convolutions take the Winograd path where it pays (the default, unless
/// the environment sets `KILN_WINOGRAD=off`); off sends them through im2col + GEMM like every
/// other convolution, for A/B measurements.
pub fn enabled() -> bool {
    WINOGRAD.get()
}

/// Switches the Winograd path on or off for the whole process.
pub fn set_enabled(on: bool) {
    WINOGRAD.set(on);
}

/// One of a convolution's three computations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The output from the input.
    Forward,
    /// The input's gradient (a stride-1 3x3 convolution of the output gradient).
    InputGradient,
    /// The weight's gradient.
    WeightGradient,
}

/// Whether `pass` of `s` takes the Winograd path: stride-1 3x3 kernels with padding at most 2
/// (the input gradient's padding is `2 - p`), at least 64 channels each side, and a layer where
/// the tiles pay for their transforms. The forward pass and the input gradient need outputs at
/// least 7 wide and 128 tiles in the batch; the weight gradient, whose GEMMs sum over the tiles
/// and write all 16 transformed `C_out x C_in` matrices, 12 wide and 256 tiles (measured with
/// `cargo bench --bench conv_kernels`: ResNet's layer4 at 7x7, batch 8, ran its forward 1.37x
/// and input gradient 1.28x as fast with Winograd, its weight gradient 2x slower).
pub fn applies(s: &Conv2dShape, pass: Pass) -> bool {
    supports(s)
        && s.channels_in >= MIN_CHANNELS
        && s.channels_out >= MIN_CHANNELS
        && Tiles::new(s).pays_off(s.batch, pass)
        && wide_or_deep(s)
        && enabled()
}

/// Outputs narrower than 12 columns (which only the forward and input-gradient passes take)
/// amortise the transforms only with many channels, the GEMM growing with their square and
/// the transforms linearly: ResNet-18's 7x7 layer4 (512 channels) gains at 224, its 8x8
/// layer1 (64 channels) at 32x32 inputs lost 5-11 % of a training step (`cargo bench --bench
/// resnet -- --only train_b32_32 --kiln-only`, `KILN_WINOGRAD=0` against 1, three rounds).
fn wide_or_deep(s: &Conv2dShape) -> bool {
    Tiles::new(s).out[1] >= 12 || s.channels_in.min(s.channels_out) >= NARROW_MIN_CHANNELS
}

/// Whether [`forward`] and [`backward_input`] compute `s` at all (whether they are worth it is
/// [`applies`]' question).
pub(crate) fn supports(s: &Conv2dShape) -> bool {
    s.kernel == [3, 3] && s.stride == [1, 1] && s.padding[0] <= 2 && s.padding[1] <= 2
}

/// The narrowest output rows and the fewest tiles in a batch that amortise the transforms'
/// per-row work and the weights' transform (forward pass and input gradient), or the transformed
/// weight gradient's 16 matrices (weight gradient); measured with `cargo bench --bench
/// conv_kernels`.
fn minimum_width_and_tiles(pass: Pass) -> (usize, usize) {
    match pass {
        Pass::Forward | Pass::InputGradient => (7, 128),
        Pass::WeightGradient => (12, 256),
    }
}

/// Tile geometry of a stride-1 3x3 convolution.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    /// Tile rows per sample (`ceil(OH / 2)`).
    rows: usize,
    /// Tiles per tile row (`ceil(OW / 2)`).
    cols: usize,
    /// Output height and width.
    out: [usize; 2],
}

impl Tiles {
    fn new(s: &Conv2dShape) -> Self {
        let out = [s.out_height(), s.out_width()];
        Tiles {
            rows: out[0].div_ceil(2),
            cols: out[1].div_ceil(2),
            out,
        }
    }

    /// Whether Winograd beats im2col for `pass` over `batch` samples: wide enough rows, enough
    /// tiles, and at least 1.5x fewer multiplications (2x2 tiles padded past the edge of
    /// odd-sized outputs waste some: 7x7 outputs need 16 tiles, 1.72x fewer; 1x1 outputs would
    /// need more).
    fn pays_off(&self, batch: usize, pass: Pass) -> bool {
        let [oh, ow] = self.out;
        let tiles = self.rows * self.cols;
        let (min_width, min_tiles) = minimum_width_and_tiles(pass);
        ow >= min_width && batch * tiles >= min_tiles && 2 * 9 * oh * ow >= 3 * 16 * tiles
    }

    /// Width of a padded input band: the columns the tiles of one tile row read.
    fn band_width(&self) -> usize {
        2 * self.cols + 2
    }
}

/// `U` for every output/input channel pair of a layer's weights (`[C_out][C_in][3][3]`), as
/// `[16][C_out][C_in]`; with `flip`, of the kernels rotated by 180 degrees (the input
/// gradient's).
fn transform_weights(c_out: usize, c_in: usize, weight: &[f32], flip: bool, u: &mut [f32]) {
    let plane = c_out * c_in;
    assert_eq!(u.len(), POSITIONS * plane, "transformed weights length");
    for (oi, kernel) in weight.chunks_exact(9).enumerate() {
        let w: [f32; 9] = std::array::from_fn(|e| kernel[if flip { 8 - e } else { e }]);
        // G g: 4x3.
        let mut t = [[0.0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (w[j], w[3 + j], w[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        // (G g) G^T: 4x4.
        for (r, row) in t.iter().enumerate() {
            let [a, b, c] = *row;
            let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            for (j, v) in out.into_iter().enumerate() {
                u[(r * 4 + j) * plane + oi] = v;
            }
        }
    }
}

thread_local! {
    /// The transformed weights of the call running on this thread, kept between calls (they
    /// are megabytes: 16 floats per kernel).
    static WEIGHTS: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// Runs `f` with the transformed weights of the layer `s` (see [`transform_weights`]).
fn with_weights<R>(weight: &[f32], s: &Conv2dShape, flip: bool, f: impl FnOnce(&[f32]) -> R) -> R {
    let (c_out, c_in) = (s.channels_out, s.channels_in);
    WEIGHTS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            let u = scratch_slice(&mut buffer, POSITIONS * c_out * c_in);
            transform_weights(c_out, c_in, weight, flip, u);
            f(u)
        }
        Err(_) => {
            let mut u = vec![0.0; POSITIONS * c_out * c_in];
            transform_weights(c_out, c_in, weight, flip, &mut u);
            f(&u)
        }
    })
}

/// Writes `V` (`[16][C_in][tiles]`) for the tile rows `rows` (global, `sample * rows + row`).
fn transform_input(
    s: &Conv2dShape,
    t: &Tiles,
    x: &[f32],
    rows: Range<usize>,
    v: &mut [f32],
    band: &mut Vec<f32>,
) {
    let (h, w) = (s.height, s.width);
    let [ph, pw] = s.padding;
    let wp = t.band_width();
    let tiles = rows.len() * t.cols;
    let plane = s.channels_in * tiles;
    band.resize(8 * wp, 0.0);
    let (d, a) = band.split_at_mut(4 * wp);
    for c in 0..s.channels_in {
        for (local, r) in rows.clone().enumerate() {
            let (n, row) = (r / t.rows, r % t.rows);
            let channel = &x[(n * s.channels_in + c) * h * w..][..h * w];
            // The 4 input rows of this tile row, zero-padded to the band.
            for (i, dst) in d.chunks_exact_mut(wp).enumerate() {
                let y = (2 * row + i) as isize - ph as isize;
                if y < 0 || y >= h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &channel[y as usize * w..][..w];
                let lo = pw.min(wp);
                let hi = (w + pw).min(wp);
                dst[..lo].fill(0.0);
                dst[lo..hi].copy_from_slice(&src[..hi - lo]);
                dst[hi..].fill(0.0);
            }
            // B^T d: combinations of rows.
            let (d0, rest) = d.split_at(wp);
            let (d1, rest) = rest.split_at(wp);
            let (d2, d3) = rest.split_at(wp);
            let (a0, rest) = a.split_at_mut(wp);
            let (a1, rest) = rest.split_at_mut(wp);
            let (a2, a3) = rest.split_at_mut(wp);
            for x in 0..wp {
                a0[x] = d0[x] - d2[x];
                a1[x] = d1[x] + d2[x];
                a2[x] = d2[x] - d1[x];
                a3[x] = d1[x] - d3[x];
            }
            // (B^T d) B: combinations of columns, one tile at a time.
            let base = c * tiles + local * t.cols;
            for (i, ai) in [&*a0, &*a1, &*a2, &*a3].into_iter().enumerate() {
                let [v0, v1, v2, v3] = position_rows(v, i, plane, base, t.cols);
                for tw in 0..t.cols {
                    let x0 = 2 * tw;
                    let (e0, e1, e2, e3) = (ai[x0], ai[x0 + 1], ai[x0 + 2], ai[x0 + 3]);
                    v0[tw] = e0 - e2;
                    v1[tw] = e1 + e2;
                    v2[tw] = e2 - e1;
                    v3[tw] = e1 - e3;
                }
            }
        }
    }
}

/// The four rows `V[4i + j][.][base..base + len]`, `j = 0..4`, of a `[16][.][.]` buffer whose
/// positions are `plane` apart.
fn position_rows(
    v: &mut [f32],
    i: usize,
    plane: usize,
    base: usize,
    len: usize,
) -> [&mut [f32]; 4] {
    let block = &mut v[4 * i * plane..(4 * i + 4) * plane];
    let (p0, rest) = block.split_at_mut(plane);
    let (p1, rest) = rest.split_at_mut(plane);
    let (p2, p3) = rest.split_at_mut(plane);
    [
        &mut p0[base..base + len],
        &mut p1[base..base + len],
        &mut p2[base..base + len],
        &mut p3[base..base + len],
    ]
}

/// The output tensor, written by several chunks at once at disjoint places.
#[derive(Clone, Copy)]
struct Output {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: chunks write disjoint output rows (each output row belongs to exactly one tile row,
// and each tile row to exactly one chunk), and the owning `&mut [f32]` outlives the writes.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// `len` elements from `offset`.
    ///
    /// # Safety
    /// No two live slices returned by this may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        assert!(offset + len <= self.len, "output row out of bounds");
        // SAFETY: in bounds (asserted); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

/// `Y = A^T M A` (+ bias) from `M` (`[16][C_out][tiles]`) into the output rows of `rows`.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    s: &Conv2dShape,
    t: &Tiles,
    m: &[f32],
    rows: Range<usize>,
    bias: Option<&[f32]>,
    accumulate: bool,
    out: Output,
    band: &mut Vec<f32>,
) {
    let [oh, ow] = t.out;
    let tiles = rows.len() * t.cols;
    let plane = s.channels_out * tiles;
    let wide = 2 * t.cols;
    band.resize(2 * wide + 8 * t.cols, 0.0);
    let (y, u) = band.split_at_mut(2 * wide);
    let (y0, y1) = y.split_at_mut(wide);
    for k in 0..s.channels_out {
        let b = bias.map_or(0.0, |b| b[k]);
        for (local, r) in rows.clone().enumerate() {
            let (n, row) = (r / t.rows, r % t.rows);
            let base = k * tiles + local * t.cols;
            let at = |p: usize| &m[p * plane + base..][..t.cols];
            // A^T M: u[r][j] for r = 0, 1 and j = 0..4, each over the tiles of the row.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (at(j), at(4 + j), at(8 + j), at(12 + j));
                let (u0, u1) = u[2 * j * t.cols..(2 * j + 2) * t.cols].split_at_mut(t.cols);
                for tw in 0..t.cols {
                    u0[tw] = m0[tw] + m1[tw] + m2[tw];
                    u1[tw] = m1[tw] - m2[tw] - m3[tw];
                }
            }
            // (A^T M) A, then the 2x2 outputs of each tile side by side in two rows.
            let ur = |r: usize, j: usize| &u[(2 * j + r) * t.cols..][..t.cols];
            for (r, yr) in [&mut *y0, &mut *y1].into_iter().enumerate() {
                let (q0, q1, q2, q3) = (ur(r, 0), ur(r, 1), ur(r, 2), ur(r, 3));
                for tw in 0..t.cols {
                    yr[2 * tw] = q0[tw] + q1[tw] + q2[tw] + b;
                    yr[2 * tw + 1] = q1[tw] - q2[tw] - q3[tw] + b;
                }
            }
            for (i, yr) in [&*y0, &*y1].into_iter().enumerate() {
                let oy = 2 * row + i;
                if oy >= oh {
                    continue;
                }
                // SAFETY: output row (n, k, oy) belongs to this tile row only.
                let dst = unsafe { out.slice(((n * s.channels_out + k) * oh + oy) * ow, ow) };
                if accumulate {
                    for (d, v) in dst.iter_mut().zip(&yr[..ow]) {
                        *d += v;
                    }
                } else {
                    dst.copy_from_slice(&yr[..ow]);
                }
            }
        }
    }
}

/// A chunk of `tiles` tiles' buffers from `scratch`: the transformed inputs
/// (`[16][C_in][tiles]`), the products or output-gradient transforms (`[16][C_out][tiles]`), and
/// the band for the transforms' rows.
fn chunk_buffers<'a>(
    s: &Conv2dShape,
    tiles: usize,
    scratch: &'a mut Scratch,
) -> (&'a mut [f32], &'a mut [f32], &'a mut Vec<f32>) {
    let Scratch { cols, wide, band } = scratch;
    let cols = scratch_slice(cols, POSITIONS * s.channels_in * tiles);
    let wide = scratch_slice(wide, POSITIONS * s.channels_out * tiles);
    (cols, wide, band)
}

/// One chunk: transform its inputs, 16 GEMMs, transform its outputs.
#[allow(clippy::too_many_arguments)]
fn run_chunk(
    s: &Conv2dShape,
    t: &Tiles,
    x: &[f32],
    (u, u_strides): (&[f32], (usize, usize)),
    rows: Range<usize>,
    bias: Option<&[f32]>,
    accumulate: bool,
    out: Output,
    par: Parallelism,
    scratch: &mut Scratch,
) {
    let tiles = rows.len() * t.cols;
    let (c_in, c_out) = (s.channels_in, s.channels_out);
    let (cols, wide, band) = chunk_buffers(s, tiles, scratch);
    transform_input(s, t, x, rows.clone(), cols, band);
    for p in 0..POSITIONS {
        matmul(
            (c_out, tiles, c_in),
            &mut wide[p * c_out * tiles..][..c_out * tiles],
            (tiles, 1),
            false,
            &u[p * c_out * c_in..][..c_out * c_in],
            u_strides,
            &cols[p * c_in * tiles..][..c_in * tiles],
            (tiles, 1),
            par,
        );
    }
    transform_output(s, t, wide, rows, bias, accumulate, out, band);
}

/// The chunks (ranges of tile rows) a batch is cut into, and whether they run in parallel (one
/// per thread, GEMMs on one thread) or one after the other (GEMMs over all threads).
fn plan(s: &Conv2dShape, t: &Tiles) -> (Vec<Range<usize>>, bool) {
    let tile_rows = s.batch * t.rows;
    let per_row = POSITIONS * (s.channels_in + s.channels_out) * t.cols;
    let max_rows = (CHUNK_BUDGET / per_row).max(1);
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && tile_rows * t.cols >= threads * MIN_TILES_PER_THREAD;
    let rows_per_chunk = if parallel {
        max_rows.min(tile_rows.div_ceil(threads))
    } else {
        max_rows
    };
    let chunks = (0..tile_rows)
        .step_by(rows_per_chunk)
        .map(|r| r..(r + rows_per_chunk).min(tile_rows))
        .collect();
    (chunks, parallel)
}

/// The GEMMs' parallelism when chunks run one after the other.
fn sequential_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// The convolution of `x` with the transformed kernels `u` (`[16]` matrices `C_out x C_in` with
/// row and column strides `u_strides`), written to `out` or, with `accumulate`, added to it.
fn convolve(
    s: &Conv2dShape,
    x: &[f32],
    u: (&[f32], (usize, usize)),
    bias: Option<&[f32]>,
    out: &mut [f32],
    accumulate: bool,
) {
    let t = Tiles::new(s);
    let (chunks, parallel_chunks) = plan(s, &t);
    let output = Output {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    if parallel_chunks {
        chunks.into_par_iter().for_each(|rows| {
            with_scratch(|scratch| {
                run_chunk(
                    s,
                    &t,
                    x,
                    u,
                    rows,
                    bias,
                    accumulate,
                    output,
                    Parallelism::None,
                    scratch,
                )
            })
        });
    } else {
        let par = sequential_parallelism();
        with_scratch(|scratch| {
            for rows in chunks {
                run_chunk(s, &t, x, u, rows, bias, accumulate, output, par, scratch);
            }
        });
    }
}

/// Forward convolution (see [`crate::conv::conv2d_forward`]) of a shape [`applies`] accepts.
pub(crate) fn forward(
    s: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    with_weights(weight, s, false, |u| {
        convolve(s, x, (u, (s.channels_in, 1)), bias, out, false)
    });
}

/// Input gradient (see [`crate::conv::conv2d_backward_input`], added to `grad_x`) of a shape
/// [`applies`] accepts: the stride-1 3x3 convolution of `grad_out` with the flipped kernels,
/// channels swapped, padding `2 - p`.
pub(crate) fn backward_input(
    s: &Conv2dShape,
    weight: &[f32],
    grad_out: &[f32],
    grad_x: &mut [f32],
) {
    let adjoint = Conv2dShape {
        batch: s.batch,
        channels_in: s.channels_out,
        height: s.out_height(),
        width: s.out_width(),
        channels_out: s.channels_in,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [2 - s.padding[0], 2 - s.padding[1]],
    };
    // The adjoint's matrix `(i, o)` is the layer's `(o, i)`: read the layer's transposed.
    with_weights(weight, s, true, |u| {
        convolve(
            &adjoint,
            grad_out,
            (u, (1, s.channels_in)),
            None,
            grad_x,
            true,
        )
    });
}

/// `dM = A dY A^T` (`[16][C_out][tiles]`) for the tile rows `rows`, from the output gradient:
/// each 2x2 block of `dY` (zero past the output's edge) as a 4x4 matrix.
fn transform_grad(
    s: &Conv2dShape,
    t: &Tiles,
    grad_out: &[f32],
    rows: Range<usize>,
    dm: &mut [f32],
    band: &mut Vec<f32>,
) {
    let [oh, ow] = t.out;
    let tiles = rows.len() * t.cols;
    let plane = s.channels_out * tiles;
    let wide = 2 * t.cols;
    band.resize(6 * wide, 0.0);
    let (d, r) = band.split_at_mut(2 * wide);
    for k in 0..s.channels_out {
        for (local, row) in rows.clone().enumerate() {
            let (n, th) = (row / t.rows, row % t.rows);
            let channel = &grad_out[(n * s.channels_out + k) * oh * ow..][..oh * ow];
            for (i, dst) in d.chunks_exact_mut(wide).enumerate() {
                let y = 2 * th + i;
                if y >= oh {
                    dst.fill(0.0);
                    continue;
                }
                dst[..ow].copy_from_slice(&channel[y * ow..][..ow]);
                dst[ow..].fill(0.0);
            }
            // A dY: rows dY0, dY0 + dY1, dY0 - dY1, -dY1.
            let (d0, d1) = d.split_at(wide);
            let (r0, rest) = r.split_at_mut(wide);
            let (r1, rest) = rest.split_at_mut(wide);
            let (r2, r3) = rest.split_at_mut(wide);
            for x in 0..wide {
                r0[x] = d0[x];
                r1[x] = d0[x] + d1[x];
                r2[x] = d0[x] - d1[x];
                r3[x] = -d1[x];
            }
            // (A dY) A^T: the same combinations of each tile's two columns.
            let base = k * tiles + local * t.cols;
            for (i, ri) in [&*r0, &*r1, &*r2, &*r3].into_iter().enumerate() {
                let [m0, m1, m2, m3] = position_rows(dm, i, plane, base, t.cols);
                for tw in 0..t.cols {
                    let (a, b) = (ri[2 * tw], ri[2 * tw + 1]);
                    m0[tw] = a;
                    m1[tw] = a + b;
                    m2[tw] = a - b;
                    m3[tw] = -b;
                }
            }
        }
    }
}

/// One chunk's share of the weight gradient in the transformed domain:
/// `dU_p (C_out x C_in) [+]= dM_p (C_out x tiles) @ V_p^T (tiles x C_in)` for the 16 positions.
#[allow(clippy::too_many_arguments)]
fn weight_chunk(
    s: &Conv2dShape,
    t: &Tiles,
    x: &[f32],
    grad_out: &[f32],
    rows: Range<usize>,
    du: &mut [f32],
    accumulate: bool,
    par: Parallelism,
    scratch: &mut Scratch,
) {
    let tiles = rows.len() * t.cols;
    let (c_in, c_out) = (s.channels_in, s.channels_out);
    let (cols, wide, band) = chunk_buffers(s, tiles, scratch);
    transform_input(s, t, x, rows.clone(), cols, band);
    transform_grad(s, t, grad_out, rows, wide, band);
    for p in 0..POSITIONS {
        matmul(
            (c_out, c_in, tiles),
            &mut du[p * c_out * c_in..][..c_out * c_in],
            (c_in, 1),
            accumulate,
            &wide[p * c_out * tiles..][..c_out * tiles],
            (tiles, 1),
            &cols[p * c_in * tiles..][..c_in * tiles],
            (1, tiles),
            par,
        );
    }
}

/// `dW = G^T dU G` for every kernel: `du` is `[16][C_out][C_in]`, `grad_weight`
/// `[C_out][C_in][3][3]`.
fn untransform_weights(du: &[f32], plane: usize, grad_weight: &mut [f32]) {
    for (oi, dw) in grad_weight.chunks_exact_mut(9).enumerate() {
        let m: [f32; 16] = std::array::from_fn(|p| du[p * plane + oi]);
        // G^T dU: 3x4, rows dU0 + (dU1 + dU2) / 2, (dU1 - dU2) / 2, (dU1 + dU2) / 2 + dU3.
        let mut z = [[0.0f32; 4]; 3];
        for j in 0..4 {
            let (a, b, c, d) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
            z[0][j] = a + 0.5 * (b + c);
            z[1][j] = 0.5 * (b - c);
            z[2][j] = 0.5 * (b + c) + d;
        }
        // (G^T dU) G: the same combinations of columns.
        for (r, zr) in z.iter().enumerate() {
            let [a, b, c, d] = *zr;
            dw[3 * r] = a + 0.5 * (b + c);
            dw[3 * r + 1] = 0.5 * (b - c);
            dw[3 * r + 2] = 0.5 * (b + c) + d;
        }
    }
}

/// Weight gradient (see [`crate::conv::conv2d_backward_weight`]; overwrites `grad_weight`) of
/// a shape [`applies`] accepts, computed in the transformed domain: 16 GEMMs per chunk whose
/// inner dimension is the chunk's tiles, then one transform back per kernel.
pub(crate) fn backward_weight(
    s: &Conv2dShape,
    x: &[f32],
    grad_out: &[f32],
    grad_weight: &mut [f32],
) {
    let t = Tiles::new(s);
    let plane = s.channels_out * s.channels_in;
    let len = POSITIONS * plane;
    let (chunks, parallel_chunks) = plan(s, &t);
    if parallel_chunks {
        // Contiguous runs of chunks per thread, each into its own partial dU.
        let threads = rayon::current_num_threads().min(chunks.len());
        let per = chunks.len().div_ceil(threads);
        let mut partials = vec![0.0f32; threads * len];
        partials
            .par_chunks_mut(len)
            .zip(chunks.par_chunks(per))
            .for_each(|(du, mine)| {
                with_scratch(|scratch| {
                    for (i, rows) in mine.iter().enumerate() {
                        let par = Parallelism::None;
                        weight_chunk(s, &t, x, grad_out, rows.clone(), du, i > 0, par, scratch);
                    }
                })
            });
        let (first, rest) = partials.split_at_mut(len);
        for partial in rest.chunks_exact(len) {
            for (a, b) in first.iter_mut().zip(partial) {
                *a += b;
            }
        }
        untransform_weights(first, plane, grad_weight);
    } else {
        let mut du = vec![0.0f32; len];
        let par = sequential_parallelism();
        with_scratch(|scratch| {
            for (i, rows) in chunks.into_iter().enumerate() {
                weight_chunk(s, &t, x, grad_out, rows, &mut du, i > 0, par, scratch);
            }
        });
        untransform_weights(&du, plane, grad_weight);
    }
}
