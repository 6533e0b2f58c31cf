//! int8 x int8 stride-1 3D convolution for CPUs with AVX-512 VNNI (`vpdpbusd`: 64 byte products
//! per instruction, four times the f32 FMA rate).
//!
//! The im2col tiles of [`super::conv3d_cpu`] are quantized as Q8_0 activations: per voxel and
//! block of 32 patch values, scale = max|x| / 127 and values rounded to the nearest integer (the
//! same blocks as the weight's Q8_0 rows, which is what int8 linear layers do per token). They
//! are stored as `q + 128` (VNNI multiplies unsigned by signed bytes) four patch values per
//! 32-bit lane, so that one `vpdpbusd` adds four products for each of 16 voxels; the weight's
//! block sums times 128 take the offset back out. Each block's integer sum is then scaled by
//! the two scales and accumulated in f32.
//!
//! Without VNNI the float kernel runs on widened weights (see [`super::conv3d::conv3d_weight`]):
//! AVX2's `vpmaddubsw` path was measured three times slower than f32 gemm per voxel.
// Other architectures never take the kernel (`available()` is false there).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports, unused_variables))]

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::conv3d_cpu::{Geometry, SendPtr, im2col};
use super::quantized::{Q8_BLOCK, Q8Matrix};

/// Output channels computed together (their patch loads are shared).
const ROWS: usize = 4;
/// Voxels per kernel step: two 16-lane vectors.
const STEP: usize = 32;

/// Whether this CPU runs the int8 kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A Q8_0 weight laid out for the kernel, output rows padded to a multiple of [`ROWS`] with zeros.
#[derive(Debug)]
pub struct PackedQ8 {
    c_out: usize,
    blocks: usize,
    /// `(rows, blocks * 8)`: four consecutive int8 weights per i32, little-endian.
    quads: Vec<i32>,
    /// `(rows, blocks)`: the block's scale.
    scales: Vec<f32>,
    /// `(rows, blocks)`: 128 times the sum of the block's values (the activation offset's share).
    offsets: Vec<i32>,
}

impl PackedQ8 {
    pub fn new(q: &Q8Matrix) -> PackedQ8 {
        let blocks = q.padded_cols() / Q8_BLOCK;
        let rows = q.rows().div_ceil(ROWS) * ROWS;
        let mut quads = vec![0i32; rows * blocks * 8];
        let mut scales = vec![0f32; rows * blocks];
        let mut offsets = vec![0i32; rows * blocks];
        for r in 0..q.rows() {
            for (b, (scale, values)) in q.row_blocks(r).iter().map(super::quantized::block_parts).enumerate() {
                for (g, four) in values.chunks_exact(4).enumerate() {
                    quads[(r * blocks + b) * 8 + g] =
                        i32::from_le_bytes([four[0], four[1], four[2], four[3]].map(|v| v as u8));
                }
                scales[r * blocks + b] = scale;
                offsets[r * blocks + b] = 128 * values.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        PackedQ8 { c_out: q.rows(), blocks, quads, scales, offsets }
    }
}

/// The int8 convolution of an f32 input with a Q8_0 weight `(c_out, c_in * k^3)`.
pub(crate) struct Conv3dQ8 {
    pub weight: Arc<Q8Matrix>,
    pub kernel: [usize; 3],
    pub padding: usize,
}

/// One tile's quantized patches: `(blocks * 8, voxels)` lanes of four bytes `q + 128` (patch
/// values `4g..4g + 4` of a block, first in the low byte) and `(blocks, voxels)` scales, `voxels`
/// padded to a multiple of [`STEP`].
#[derive(Default)]
struct QuantizedTile {
    quads: Vec<u32>,
    scales: Vec<f32>,
    inverse: Vec<f32>,
}

/// Quantizes the first `t` voxels of `cols` (`k_len x tile_len`) into `tile`, `blocks` Q8_0
/// blocks deep; rows past `k_len` and voxels past `t` are zero. Written as loops over voxels
/// with four rows at a time, so that they vectorize; compiled for AVX-512 with the kernel.
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_tile(
    cols: &[f32],
    k_len: usize,
    tile_len: usize,
    t: usize,
    blocks: usize,
    tile: &mut QuantizedTile,
) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const ZERO: u32 = 0x8080_8080;
    let tp = t.div_ceil(STEP) * STEP;
    tile.quads.clear();
    tile.quads.resize(blocks * 8 * tp, ZERO);
    tile.scales.clear();
    tile.scales.resize(blocks * tp, 0.0);
    tile.inverse.resize(t, 0.0);
    let QuantizedTile { quads, scales, inverse } = tile;
    let zeros = vec![0f32; t];
    let row = |k: usize| if k < k_len { &cols[k * tile_len..k * tile_len + t] } else { &zeros[..] };
    for b in 0..blocks {
        let amax = &mut scales[b * tp..b * tp + t];
        for k in 32 * b..(32 * b + 32).min(k_len) {
            for (m, v) in amax.iter_mut().zip(row(k)) {
                *m = m.max(v.abs());
            }
        }
        for (s, inv) in amax.iter_mut().zip(inverse.iter_mut()) {
            *s /= 127.0;
            *inv = if *s != 0.0 { 1.0 / *s } else { 0.0 };
        }
        for g in 0..8 {
            let k = 32 * b + 4 * g;
            if k >= k_len {
                break;
            }
            let dst = &mut quads[(b * 8 + g) * tp..(b * 8 + g) * tp + t];
            let lanes = dst.iter_mut().zip(row(k)).zip(row(k + 1)).zip(row(k + 2)).zip(row(k + 3)).zip(&inverse[..t]);
            for (((((d, &x0), &x1), &x2), &x3), &inv) in lanes {
                // MAGIC + r for an integer |r| < 2^22 has r in the low bits of its encoding (and
                // a zero low byte for r = 0), so the byte needs no float-to-int conversion.
                let q = |x: f32| (x * inv + MAGIC).to_bits().wrapping_add(128) & 0xff;
                *d = q(x0) | q(x1) << 8 | q(x2) << 16 | q(x3) << 24;
            }
        }
    }
}

/// The tile's output channels: `out[co * stride + v]` for `v < t`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `out` is valid for `c_out` rows of `t` floats `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni(tile: &QuantizedTile, t: usize, w: &PackedQ8, out: *mut f32, stride: usize) {
    use std::arch::x86_64::*;
    let tp = t.div_ceil(STEP) * STEP;
    let nb = w.blocks;
    for co0 in (0..w.c_out).step_by(ROWS) {
        for v0 in (0..tp).step_by(STEP) {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for b in 0..nb {
                let mut sums = [[_mm512_setzero_si512(); 2]; ROWS];
                for g in 0..8 {
                    // SAFETY: (b * 8 + g) * tp + v0 + 32 lanes lie within `quads`.
                    let (x0, x1) = unsafe {
                        let p = tile.quads.as_ptr().add((b * 8 + g) * tp + v0);
                        (_mm512_loadu_si512(p as *const _), _mm512_loadu_si512(p.add(16) as *const _))
                    };
                    for (r, s) in sums.iter_mut().enumerate() {
                        let quad = _mm512_set1_epi32(w.quads[((co0 + r) * nb + b) * 8 + g]);
                        s[0] = _mm512_dpbusd_epi32(s[0], x0, quad);
                        s[1] = _mm512_dpbusd_epi32(s[1], x1, quad);
                    }
                }
                // SAFETY: b * tp + v0 + 32 <= blocks * tp scales.
                let (d0, d1) = unsafe {
                    let p = tile.scales.as_ptr().add(b * tp + v0);
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let offset = _mm512_set1_epi32(w.offsets[(co0 + r) * nb + b]);
                    let scale = _mm512_set1_ps(w.scales[(co0 + r) * nb + b]);
                    for (h, d) in [d0, d1].into_iter().enumerate() {
                        let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(s[h], offset));
                        a[h] = _mm512_fmadd_ps(exact, _mm512_mul_ps(d, scale), a[h]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(w.c_out - co0) {
                for (h, v) in a.iter().enumerate() {
                    let start = v0 + 16 * h;
                    if start < t {
                        let mask: u16 = if t - start >= 16 { u16::MAX } else { (1u16 << (t - start)) - 1 };
                        // SAFETY: row co0 + r < c_out, voxels start..start + popcount(mask) < t.
                        unsafe { _mm512_mask_storeu_ps(out.add((co0 + r) * stride + start), mask, *v) };
                    }
                }
            }
        }
    }
}

/// The convolution, tile by tile over rayon's pool.
fn conv_q8(x: &[f32], w: &PackedQ8, batch: usize, g: Geometry) -> Vec<f32> {
    let [od, ho, wo] = g.out;
    let spatial = od * ho * wo;
    let k_len = g.c_in * g.k.iter().product::<usize>();
    let rows_per_tile = g.rows_per_tile();
    let tile_len = rows_per_tile * wo;
    let total_rows = od * ho;
    let mut out = vec![0f32; batch * g.c_out * spatial];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let in_len = g.c_in * g.d * g.h * g.w;
    let tiles = g.tiles(batch);
    tiles.par_iter().for_each_init(
        || (vec![0f32; k_len * tile_len], QuantizedTile::default()),
        |(cols, tile), &(b, row0)| {
            let rows = rows_per_tile.min(total_rows - row0);
            im2col(&x[b * in_len..(b + 1) * in_len], g, row0, rows, cols, tile_len);
            let base = &out_ptr;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the op runs only where `available()` holds; this tile writes output elements
            // [b, o, row0 * wo .. (row0 + rows) * wo) for every o, which no other tile touches.
            unsafe {
                quantize_tile(cols, k_len, tile_len, rows * wo, w.blocks, tile);
                tile_vnni(tile, rows * wo, w, base.0.add(b * g.c_out * spatial + row0 * wo), spatial)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("the int8 kernel runs only where `available()` holds: {:p}", base.0);
        },
    );
    out
}

impl CustomOp1 for Conv3dQ8 {
    fn name(&self) -> &'static str {
        "prosam-conv3d-int8"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if !available() {
            bail!("prosam-conv3d-int8: this CPU lacks AVX-512 VNNI");
        }
        let CpuStorage::F32(x) = s else { bail!("prosam-conv3d-int8: the input must be f32") };
        let (x0, x1) = super::contiguous_range(l, "prosam-conv3d-int8")?;
        let taps: usize = self.kernel.iter().product();
        let c_in = self.weight.cols() / taps.max(1);
        let [kd, kh, kw] = self.kernel;
        let (b, g) = Geometry::of(l.dims(), &[self.weight.rows(), c_in, kd, kh, kw], self.padding)?;
        let packed = self.weight.conv_pack();
        let shape = Shape::from((b, g.c_out, g.out[0], g.out[1], g.out[2]));
        Ok((CpuStorage::F32(conv_q8(&x[x0..x1], packed, b, g)), shape))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The kernel's arithmetic in scalar form: the same quantized tile, integer block sums, and the
    /// same f32 operations in the same order (one fused multiply-add per block).
    fn tile_scalar(tile: &QuantizedTile, t: usize, w: &PackedQ8, out: &mut [f32], stride: usize) {
        let tp = t.div_ceil(STEP) * STEP;
        let nb = w.blocks;
        for co in 0..w.c_out {
            for v in 0..t {
                let mut acc = 0f32;
                for b in 0..nb {
                    let mut sum = 0i32;
                    for g in 0..8 {
                        let x = tile.quads[(b * 8 + g) * tp + v].to_le_bytes();
                        let quad = w.quads[(co * nb + b) * 8 + g].to_le_bytes();
                        sum += (0..4).map(|j| x[j] as i32 * quad[j] as i8 as i32).sum::<i32>();
                    }
                    let exact = (sum - w.offsets[co * nb + b]) as f32;
                    acc = exact.mul_add(tile.scales[b * tp + v] * w.scales[co * nb + b], acc);
                }
                out[co * stride + v] = acc;
            }
        }
    }

    #[test]
    fn vnni_kernel_equals_its_scalar_form_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        // 5 output rows (one past a group of 4), 3 blocks with a partial last one (70 of 96
        // values), 45 voxels (a full step and a masked tail).
        let (c_out, k_len, t) = (5, 70, 45);
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..c_out * k_len).map(|_| next() * 0.3).collect();
        let wt = candle_core::Tensor::from_vec(w, (c_out, k_len), &candle_core::Device::Cpu).unwrap();
        let (q, _) = Q8Matrix::quantize(&wt).unwrap();
        let packed = PackedQ8::new(&q);
        let tile_len = 48;
        let mut cols: Vec<f32> = (0..k_len * tile_len).map(|_| next() * 3.0).collect();
        cols[5 * tile_len..6 * tile_len].fill(0.0);
        let mut tile = QuantizedTile::default();
        // SAFETY: checked `available()`.
        unsafe { quantize_tile(&cols, k_len, tile_len, t, packed.blocks, &mut tile) };
        let mut expected = vec![f32::NAN; c_out * t];
        tile_scalar(&tile, t, &packed, &mut expected, t);
        let mut got = vec![f32::NAN; c_out * t];
        // SAFETY: checked `available()`; `got` holds c_out rows of t.
        unsafe { tile_vnni(&tile, t, &packed, got.as_mut_ptr(), t) };
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // And the scalar form is the convolution's dot product up to the quantization.
        let dense = q.dequantize();
        for co in 0..c_out {
            for v in 0..t {
                let exact: f32 = (0..k_len).map(|k| dense[co * k_len + k] * cols[k * tile_len + v]).sum();
                let bound: f32 = (0..k_len).map(|k| dense[co * k_len + k].abs()).sum::<f32>() * 3.0 / 254.0;
                assert!((expected[co * t + v] - exact).abs() <= bound, "row {co} voxel {v}");
            }
        }
    }
}
