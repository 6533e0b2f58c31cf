//! A CPU kernel for stride-1 3D convolution: tiles of zero-padded input lines multiplied by the `gemm`
//! crate once per width tap (the forward pass; im2col for the weight gradient), tiles spread over
//! rayon's pool. Candle's `conv2d` on depth slices runs at 4-10 GMAC/s for SwinUNETR's narrow
//! channel counts (12-48) because of its per-call layout copies; this kernel copies each input
//! line a tile needs once per (depth, height) tap and multiplies in place. Full im2col copied it
//! for every width tap too (with its copies, a seventh of an fs 12 window's time); one-thread
//! windows measured 5-15 % faster with the lines.
//!
//! In f32 on CPUs with AVX-512 the forward pass (and so the input's gradient) is the direct kernel
//! of [`super::conv3d_avx512`] where the output channels come in 12s or 8s.
//!
//! With its backward pass, so that training uses it too: the input's gradient is the same kernel
//! on the output's gradient with the weight transposed and flipped (padding `k - 1 - p`), the
//! weight's gradient a gemm of the output's gradient with im2col tiles, accumulated in
//! fixed groups of tiles (so that training stays reproducible).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Stride-1 convolution with zero padding `padding` on every axis.
pub(crate) struct Conv3dCpu {
    pub padding: usize,
}

/// Geometry of one convolution.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub c_in: usize,
    pub c_out: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
    pub k: [usize; 3],
    pub pad: usize,
    pub out: [usize; 3],
}

/// Groups of tiles whose weight gradients are accumulated separately (in parallel) and then summed
/// in order: enough to keep 16 threads busy, few enough that the sums stay cheap.
const WEIGHT_GRAD_GROUPS: usize = 32;

/// Patch-matrix elements per tile: about 1 MB of f32, so that a tile stays in L2 while gemm reads it.
const TILE_ELEMENTS: usize = 1 << 18;

pub(super) struct SendPtr<T>(pub *mut T);
// SAFETY: tiles write disjoint output ranges (see `conv`), so sharing the base pointer is sound.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl Geometry {
    /// The geometry of `x (B, Cin, D, H, W)` convolved with `w (Cout, Cin, kd, kh, kw)`, stride 1
    /// and `padding` on every axis; also the batch size.
    pub fn of(x: &[usize], w: &[usize], padding: usize) -> Result<(usize, Geometry)> {
        let [b, c_in, d, h, wd] = x else { bail!("prosam-conv3d-cpu: the input must be 5D, got {x:?}") };
        let [c_out, w_in, kd, kh, kw] = w else { bail!("prosam-conv3d-cpu: the weight must be 5D, got {w:?}") };
        if w_in != c_in {
            bail!("prosam-conv3d-cpu: {c_in} input channels, weight expects {w_in}");
        }
        let p = padding;
        if d + 2 * p < *kd || h + 2 * p < *kh || wd + 2 * p < *kw {
            bail!("prosam-conv3d-cpu: kernel larger than the padded input");
        }
        let out = [d + 2 * p + 1 - kd, h + 2 * p + 1 - kh, wd + 2 * p + 1 - kw];
        Ok((*b, Geometry { c_in: *c_in, c_out: *c_out, d: *d, h: *h, w: *wd, k: [*kd, *kh, *kw], pad: p, out }))
    }

    /// Rows (one (z, y) line of the output each) per tile, so that a tile's patches fill about
    /// [`TILE_ELEMENTS`].
    pub fn rows_per_tile(&self) -> usize {
        let k_len = self.c_in * self.k.iter().product::<usize>();
        (TILE_ELEMENTS / (k_len * self.out[2])).max(1)
    }

    /// Rows per tile of the forward kernel, whose [`line_buffers`] hold `kw` times fewer values
    /// than the patches: about [`TILE_ELEMENTS`] of them.
    fn rows_per_line_tile(&self) -> usize {
        let lines = self.c_in * self.k[0] * self.k[1];
        (TILE_ELEMENTS / (lines * (self.w + 2 * self.pad))).max(1)
    }

    /// Every `(sample, first row)` tile of a batch, `step` rows each.
    fn tiles_of(&self, batch: usize, step: usize) -> Vec<(usize, usize)> {
        let rows = self.out[0] * self.out[1];
        (0..batch).flat_map(|b| (0..rows).step_by(step).map(move |r| (b, r))).collect()
    }

    /// Every `(sample, first row)` tile of a batch.
    pub fn tiles(&self, batch: usize) -> Vec<(usize, usize)> {
        self.tiles_of(batch, self.rows_per_tile())
    }
}

/// Fills `cols` (`K x tile_len`, row-major) with the input patches of output rows
/// `[row0, row0 + rows)` (a row is one (z, y) line of the output).
pub(super) fn im2col<T: Copy + Default>(
    x: &[T],
    g: Geometry,
    row0: usize,
    rows: usize,
    cols: &mut [T],
    tile_len: usize,
) {
    let [kd, kh, kw] = g.k;
    let [_, ho, wo] = g.out;
    let zero = T::default();
    for c in 0..g.c_in {
        let plane = &x[c * g.d * g.h * g.w..(c + 1) * g.d * g.h * g.w];
        for a in 0..kd {
            for b in 0..kh {
                for e in 0..kw {
                    let kidx = ((c * kd + a) * kh + b) * kw + e;
                    let dst = &mut cols[kidx * tile_len..kidx * tile_len + rows * wo];
                    // Output x reads input x + e - pad: valid for x in [lo, hi).
                    let lo = g.pad.saturating_sub(e).min(wo);
                    let hi = (g.w + g.pad).saturating_sub(e).clamp(lo, wo);
                    for (i, seg) in dst.chunks_exact_mut(wo).enumerate() {
                        let r = row0 + i;
                        let (z, y) = (r / ho, r % ho);
                        let (zi, yi) = ((z + a).wrapping_sub(g.pad), (y + b).wrapping_sub(g.pad));
                        if zi >= g.d || yi >= g.h {
                            seg.fill(zero);
                            continue;
                        }
                        let src = &plane[(zi * g.h + yi) * g.w..(zi * g.h + yi + 1) * g.w];
                        seg[..lo].fill(zero);
                        seg[lo..hi].copy_from_slice(&src[lo + e - g.pad..hi + e - g.pad]);
                        seg[hi..].fill(zero);
                    }
                }
            }
        }
    }
}

/// Fills `lines` with the zero-padded input lines that output rows `[row0, row0 + rows)` read:
/// for every (channel, depth tap, height tap), `rows` lines of `w + 2 pad` values (the input row
/// with `pad` zeros each side), one block of `stride` values per (channel, depth, height). Width
/// taps are not copied: tap `e` reads the same lines `e` values further on, a third of
/// [`im2col`]'s copies for a 3^3 kernel.
fn line_buffers<T: Copy + Default>(x: &[T], g: Geometry, row0: usize, rows: usize, lines: &mut [T], stride: usize) {
    let [kd, kh, _] = g.k;
    let [_, ho, _] = g.out;
    let wp = g.w + 2 * g.pad;
    let zero = T::default();
    for c in 0..g.c_in {
        let plane = &x[c * g.d * g.h * g.w..(c + 1) * g.d * g.h * g.w];
        for a in 0..kd {
            for b in 0..kh {
                let block = ((c * kd + a) * kh + b) * stride;
                for (i, line) in lines[block..block + rows * wp].chunks_exact_mut(wp).enumerate() {
                    let (z, y) = ((row0 + i) / ho, (row0 + i) % ho);
                    let (zi, yi) = ((z + a).wrapping_sub(g.pad), (y + b).wrapping_sub(g.pad));
                    if zi >= g.d || yi >= g.h {
                        line.fill(zero);
                        continue;
                    }
                    line[..g.pad].fill(zero);
                    line[g.pad..g.pad + g.w].copy_from_slice(&plane[(zi * g.h + yi) * g.w..(zi * g.h + yi + 1) * g.w]);
                    line[g.pad + g.w..].fill(zero);
                }
            }
        }
    }
}

/// The forward kernel: per tile of output rows, [`line_buffers`] and one gemm per width tap
/// (`K = c_in * kd * kh`), accumulated over padded-width rows whose last `kw - 1` values are
/// discarded when the tile is copied out.
fn conv<T>(x: &[T], weight: &[T], batch: usize, g: Geometry) -> Vec<T>
where
    T: Copy + Default + Send + Sync + 'static + num_one::One,
{
    let [od, ho, wo] = g.out;
    let [kd, kh, kw] = g.k;
    let spatial = od * ho * wo;
    let k_len = g.c_in * kd * kh * kw;
    let lines_k = g.c_in * kd * kh;
    let wp = g.w + 2 * g.pad;
    let rows_per_tile = g.rows_per_line_tile();
    // Tap e reads up to kw - 1 values past a block's last line.
    let stride = rows_per_tile * wp + kw - 1;
    let total_rows = od * ho;
    let mut out = vec![T::default(); batch * g.c_out * spatial];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let in_len = g.c_in * g.d * g.h * g.w;
    let tiles = g.tiles_of(batch, rows_per_tile);
    tiles.par_iter().for_each_init(
        || (vec![T::default(); lines_k * stride], vec![T::default(); g.c_out * rows_per_tile * wp]),
        |(lines, acc), &(b, row0)| {
            let rows = rows_per_tile.min(total_rows - row0);
            line_buffers(&x[b * in_len..(b + 1) * in_len], g, row0, rows, lines, stride);
            let m = rows * wp;
            for e in 0..kw {
                // SAFETY: dst is `acc` (c_out columns of m); lhs element (i, k) is
                // lines[e + k * stride + i] with i + e < rows * wp + kw - 1 <= stride; rhs element
                // (k, o) is weight[e + k * kw + o * k_len], within the (c_out, k_len) weight.
                unsafe {
                    gemm::gemm(
                        m,
                        g.c_out,
                        lines_k,
                        acc.as_mut_ptr(),
                        m as isize,
                        1,
                        e > 0,
                        lines.as_ptr().add(e),
                        stride as isize,
                        1,
                        weight.as_ptr().add(e),
                        k_len as isize,
                        kw as isize,
                        T::one(),
                        T::one(),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            let base = &out_ptr;
            for o in 0..g.c_out {
                for i in 0..rows {
                    let src = &acc[o * m + i * wp..o * m + i * wp + wo];
                    // SAFETY: this tile alone writes output rows [row0, row0 + rows) of sample b,
                    // for every channel o; row row0 + i holds wo values.
                    unsafe {
                        let dst = base.0.add((b * g.c_out + o) * spatial + (row0 + i) * wo);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, wo);
                    }
                }
            }
        },
    );
    out
}

/// The f32 forward: the direct AVX-512 kernel where the CPU and the channel count allow, the
/// gemm kernel otherwise.
fn conv_f32(x: &[f32], weight: &[f32], batch: usize, g: Geometry) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::conv3d_avx512::available()
        && let Some((y, _)) = super::conv3d_avx512::conv(x, weight, batch, g, None, false)
    {
        return y;
    }
    conv(x, weight, batch, g)
}

/// The weight's gradient, `(c_out, c_in * k^3)` row-major: `sum over voxels of grad_y (c_out x M)
/// times im2col(x)^T (M x K)`, tile by tile into one accumulator per group of tiles, then summed in order.
fn weight_grad<T>(x: &[T], grad_y: &[T], batch: usize, g: Geometry) -> Vec<T>
where
    T: Copy + Default + Send + Sync + 'static + num_one::One + std::ops::Add<Output = T>,
{
    let [od, ho, wo] = g.out;
    let spatial = od * ho * wo;
    let k_len = g.c_in * g.k.iter().product::<usize>();
    let rows_per_tile = g.rows_per_tile();
    let tile_len = rows_per_tile * wo;
    let total_rows = od * ho;
    let in_len = g.c_in * g.d * g.h * g.w;
    // Tiles are summed in fixed groups, and the groups in order, so that the gradient is the same
    // bit for bit whatever the thread count or scheduling (training runs are reproducible).
    let tiles = g.tiles(batch);
    let group = tiles.len().div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    let partials: Vec<Vec<T>> = tiles
        .par_chunks(group)
        .map(|chunk| {
            let mut acc = vec![T::default(); g.c_out * k_len];
            let mut cols = vec![T::default(); k_len * tile_len];
            for &(b, row0) in chunk {
                let rows = rows_per_tile.min(total_rows - row0);
                im2col(&x[b * in_len..(b + 1) * in_len], g, row0, rows, &mut cols, tile_len);
                let dy = &grad_y[b * g.c_out * spatial + row0 * wo..];
                // SAFETY: acc is c_out x k_len (row stride k_len); dy is read at o * spatial + m for
                // m < rows * wo, within the sample's gradient; cols at k * tile_len + m, within the tile.
                unsafe {
                    gemm::gemm(
                        g.c_out,
                        k_len,
                        rows * wo,
                        acc.as_mut_ptr(),
                        1,
                        k_len as isize,
                        true,
                        dy.as_ptr(),
                        1,
                        spatial as isize,
                        cols.as_ptr(),
                        tile_len as isize,
                        1,
                        T::one(),
                        T::one(),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let first = partials.next().unwrap_or_else(|| vec![T::default(); g.c_out * k_len]);
    partials.fold(first, |a, b| a.into_iter().zip(b).map(|(u, v)| u + v).collect())
}

/// The scalar one gemm needs, for the two float types this kernel serves.
mod num_one {
    pub trait One {
        fn one() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
    }
    impl One for f64 {
        fn one() -> Self {
            1.0
        }
    }
}

impl CustomOp2 for Conv3dCpu {
    fn name(&self) -> &'static str {
        "prosam-conv3d-cpu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((x0, x1), (w0, w1)) =
            (super::contiguous_range(l1, "prosam-conv3d-cpu")?, super::contiguous_range(l2, "prosam-conv3d-cpu")?);
        let (b, g) = Geometry::of(l1.dims(), l2.dims(), self.padding)?;
        let shape = Shape::from((b, g.c_out, g.out[0], g.out[1], g.out[2]));
        let storage = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(wt)) => CpuStorage::F32(conv_f32(&x[x0..x1], &wt[w0..w1], b, g)),
            (CpuStorage::F64(x), CpuStorage::F64(wt)) => CpuStorage::F64(conv(&x[x0..x1], &wt[w0..w1], b, g)),
            _ => bail!("prosam-conv3d-cpu: only f32 and f64 inputs of one dtype"),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, g) = Geometry::of(x.dims(), w.dims(), self.padding)?;
        let [kd, kh, kw] = g.k;
        if kd != kh || kh != kw || self.padding >= kd {
            bail!("prosam-conv3d-cpu: the backward pass needs a cubic kernel larger than the padding");
        }
        let grad_y = grad_y.contiguous()?;
        // dL/dx: the output's gradient convolved with the weight transposed (in <-> out) and
        // flipped on every spatial axis, with the complementary padding.
        let flip = Tensor::from_vec((0..kd as u32).rev().collect::<Vec<_>>(), kd, w.device())?;
        let mut w_t = w.transpose(0, 1)?.contiguous()?;
        for axis in 2..5 {
            w_t = w_t.index_select(&flip, axis)?.contiguous()?;
        }
        let grad_x = grad_y.apply_op2_no_bwd(&w_t, &Conv3dCpu { padding: kd - 1 - self.padding })?;
        let grad_w = x.contiguous()?.apply_op2_no_bwd(&grad_y, &Conv3dWeightGrad { conv: self, kernel: g.k })?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// The weight's gradient of a [`Conv3dCpu`]: `(x, grad_y)` to `(Cout, Cin, kd, kh, kw)`.
struct Conv3dWeightGrad<'a> {
    conv: &'a Conv3dCpu,
    kernel: [usize; 3],
}

impl CustomOp2 for Conv3dWeightGrad<'_> {
    fn name(&self) -> &'static str {
        "prosam-conv3d-cpu-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((x0, x1), (y0, y1)) =
            (super::contiguous_range(l1, "prosam-conv3d-cpu")?, super::contiguous_range(l2, "prosam-conv3d-cpu")?);
        let x_dims = l1.dims();
        let [kd, kh, kw] = self.kernel;
        let c_out = l2.dims()[1];
        let (b, g) = Geometry::of(x_dims, &[c_out, x_dims[1], kd, kh, kw], self.conv.padding)?;
        if l2.dims() != [b, c_out, g.out[0], g.out[1], g.out[2]] {
            bail!("prosam-conv3d-cpu: output gradient {:?} does not match the convolution", l2.dims());
        }
        let storage = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(weight_grad(&x[x0..x1], &dy[y0..y1], b, g)),
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => CpuStorage::F64(weight_grad(&x[x0..x1], &dy[y0..y1], b, g)),
            _ => bail!("prosam-conv3d-cpu: only f32 and f64 inputs of one dtype"),
        };
        Ok((storage, Shape::from((c_out, g.c_in, kd, kh, kw))))
    }
}
