//! The fused window attention's f32 kernels for x86-64, AVX2 + FMA and AVX-512F, at the head
//! widths of the SwinUNETR students (4 at fs 12, 8 at fs 24), written with intrinsics: the head
//! width as a constant keeps `q` and the `D` accumulators in registers, and keys are padded to a
//! whole number of vectors (a 7^3 window has 343) so that no token leaves the vector path.
//!
//! Per query two passes over its keys: scores (`bias + shift mask + q.k`, stored, with their
//! maximum), then `e^(s - max)` summed and multiplied into `v` in the same loop. The shift mask is
//! made in registers from the tokens' regions (-100 where a key's region is not the query's), not
//! read from an `n x n` matrix.

use std::arch::x86_64::*;

use super::attention::HeadScratch;
use super::simd::{exp_nonpositive_avx2, exp_nonpositive_avx512};

/// The sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane_sum(v: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
}

/// The largest of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane_max(v: __m256) -> f32 {
    let half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let quad = _mm_max_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_max_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
}

/// Sizes `buf` for keys padded to `padded` (`kv_len = D * padded` values each for `k_t` and `v_t`,
/// zeroed: padding keys are zeros and their scores -inf, so they add nothing to the sum or the
/// output) and returns the tokens' shift regions padded likewise.
#[inline(always)]
fn padded_keys(buf: &mut HeadScratch, kv_len: usize, padded: usize, regions: Option<&[u32]>) -> Option<Vec<u32>> {
    buf.k_t.clear();
    buf.k_t.resize(kv_len, 0.0);
    buf.v_t.clear();
    buf.v_t.resize(kv_len, 0.0);
    buf.scores.resize(padded, 0.0);
    regions.map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(padded).collect())
}

/// Head `h`'s keys and values from the qkv `rows` (`3 * c` values per token), transposed to
/// `[e][token]` rows of `padded`.
#[inline(always)]
fn transpose_head<const D: usize>(rows: &[f32], c: usize, h: usize, padded: usize, k_t: &mut [f32], v_t: &mut [f32]) {
    for (t, row) in rows.chunks_exact(3 * c).enumerate() {
        for e in 0..D {
            k_t[e * padded + t] = row[c + h * D + e];
            v_t[e * padded + t] = row[2 * c + h * D + e];
        }
    }
}

/// One window, every head, for heads of `D` channels: `rows (n, 3 * heads * D)` as the qkv
/// projection lays them out, `bias (heads, n, n)`, the tokens' shift `regions (n)` or none when
/// the window is not masked, `out (n, heads * D)`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend_window<const D: usize>(
    rows: &[f32],
    n: usize,
    heads: usize,
    scale: f32,
    bias: &[f32],
    regions: Option<&[u32]>,
    out: &mut [f32],
    buf: &mut HeadScratch,
) {
    let c = heads * D;
    assert!(rows.len() == 3 * n * c && bias.len() == heads * n * n && out.len() == n * c);
    assert!(regions.is_none_or(|r| r.len() == n));
    let padded = n.div_ceil(8) * 8;
    let full = n / 8 * 8;
    let tail = n - full;
    let key_regions = padded_keys(buf, D * padded, padded, regions);
    let HeadScratch { k_t, v_t, scores } = buf;
    let masked = _mm256_set1_ps(-100.0);
    let tail_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for h in 0..heads {
        transpose_head::<D>(rows, c, h, padded, k_t, v_t);
        let (kp, vp, sp) = (k_t.as_ptr(), v_t.as_ptr(), scores.as_mut_ptr());
        for i in 0..n {
            let q = &rows[i * 3 * c + h * D..i * 3 * c + (h + 1) * D];
            let qv: [__m256; D] = std::array::from_fn(|e| _mm256_set1_ps(q[e] * scale));
            let bias_row = bias[(h * n + i) * n..].as_ptr();
            // The query's region against every key's: -100 where they differ.
            let region_of = key_regions.as_ref().map(|r| (_mm256_set1_epi32(r[i] as i32), r.as_ptr()));
            let shift_mask = |j: usize| {
                region_of.map(|(qr, kr)| {
                    // SAFETY: `key_regions` holds `padded` entries and j + 8 <= padded.
                    let kr = unsafe { _mm256_loadu_si256(kr.add(j).cast()) };
                    _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(kr, qr)), masked)
                })
            };
            // SAFETY: full loads read lanes j..j+8 <= n of a bias row (n long, asserted above)
            // and of the padded key rows; the tail's masked load touches only lanes below n;
            // stores stay within `padded` scores.
            let max = unsafe {
                let mut max = neg_inf;
                let mut j = 0;
                while j < full {
                    let mut s = _mm256_loadu_ps(bias_row.add(j));
                    if let Some(m) = shift_mask(j) {
                        s = _mm256_add_ps(s, m);
                    }
                    for e in 0..D {
                        s = _mm256_fmadd_ps(qv[e], _mm256_loadu_ps(kp.add(e * padded + j)), s);
                    }
                    max = _mm256_max_ps(s, max);
                    _mm256_storeu_ps(sp.add(j), s);
                    j += 8;
                }
                if tail > 0 {
                    let mut s = _mm256_maskload_ps(bias_row.add(full), tail_lanes);
                    if let Some(m) = shift_mask(full) {
                        s = _mm256_add_ps(s, m);
                    }
                    for e in 0..D {
                        s = _mm256_fmadd_ps(qv[e], _mm256_loadu_ps(kp.add(e * padded + full)), s);
                    }
                    s = _mm256_blendv_ps(neg_inf, s, _mm256_castsi256_ps(tail_lanes));
                    max = _mm256_max_ps(s, max);
                    _mm256_storeu_ps(sp.add(full), s);
                }
                _mm256_set1_ps(lane_max(max))
            };
            // SAFETY: every load reads 8 lanes below `padded` of the scores or of a value row.
            let (total, acc) = unsafe {
                let mut total = _mm256_setzero_ps();
                let mut acc = [_mm256_setzero_ps(); D];
                let mut j = 0;
                while j < padded {
                    let p = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(sp.add(j)), max));
                    total = _mm256_add_ps(total, p);
                    for e in 0..D {
                        acc[e] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp.add(e * padded + j)), acc[e]);
                    }
                    j += 8;
                }
                (total, acc)
            };
            let inv = 1.0 / lane_sum(total);
            let dst = &mut out[i * c + h * D..i * c + (h + 1) * D];
            for e in 0..D {
                dst[e] = lane_sum(acc[e]) * inv;
            }
        }
    }
}

/// The kernel in 512-bit vectors for AVX-512 CPUs (16 keys a step, a 7^3 window padded to 352):
/// half the instructions of the 256-bit form for the same arithmetic, and 32 registers, so that
/// the exponential's constants, `q` and the accumulators do not spill (the 256-bit form took 51 ms
/// on the first Swin stage's shape, compiled with AVX-512VL's registers 43 ms, this one 38 ms).
/// The shift mask is a masked add. Same arguments as [`attend_window`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend_window_avx512<const D: usize>(
    rows: &[f32],
    n: usize,
    heads: usize,
    scale: f32,
    bias: &[f32],
    regions: Option<&[u32]>,
    out: &mut [f32],
    buf: &mut HeadScratch,
) {
    let c = heads * D;
    assert!(rows.len() == 3 * n * c && bias.len() == heads * n * n && out.len() == n * c);
    assert!(regions.is_none_or(|r| r.len() == n));
    let padded = n.div_ceil(16) * 16;
    let full = n / 16 * 16;
    let tail_lanes: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
    let key_regions = padded_keys(buf, D * padded, padded, regions);
    let HeadScratch { k_t, v_t, scores } = buf;
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let masked = _mm512_set1_ps(-100.0);
    for h in 0..heads {
        transpose_head::<D>(rows, c, h, padded, k_t, v_t);
        let (kp, vp, sp) = (k_t.as_ptr(), v_t.as_ptr(), scores.as_mut_ptr());
        for i in 0..n {
            let q = &rows[i * 3 * c + h * D..i * 3 * c + (h + 1) * D];
            let qv: [__m512; D] = std::array::from_fn(|e| _mm512_set1_ps(q[e] * scale));
            let bias_row = bias[(h * n + i) * n..].as_ptr();
            let region_of = key_regions.as_ref().map(|r| (_mm512_set1_epi32(r[i] as i32), r.as_ptr()));
            // Adds -100 to the lanes whose key lies in another region than the query.
            let shift_mask = |s: __m512, j: usize| match region_of {
                // SAFETY: `key_regions` holds `padded` entries and j + 16 <= padded.
                Some((qr, kr)) => {
                    let same = _mm512_cmpeq_epi32_mask(unsafe { _mm512_loadu_si512(kr.add(j).cast()) }, qr);
                    _mm512_mask_add_ps(s, !same, s, masked)
                }
                None => s,
            };
            // SAFETY: full loads read lanes j..j+16 <= n of a bias row (n long, asserted above)
            // and of the padded key rows; the tail's masked load touches only lanes below n;
            // stores stay within `padded` scores.
            let max = unsafe {
                let mut max = neg_inf;
                let mut j = 0;
                while j < full {
                    let mut s = shift_mask(_mm512_loadu_ps(bias_row.add(j)), j);
                    for e in 0..D {
                        s = _mm512_fmadd_ps(qv[e], _mm512_loadu_ps(kp.add(e * padded + j)), s);
                    }
                    max = _mm512_max_ps(s, max);
                    _mm512_storeu_ps(sp.add(j), s);
                    j += 16;
                }
                if full < n {
                    let mut s = shift_mask(_mm512_maskz_loadu_ps(tail_lanes, bias_row.add(full)), full);
                    for e in 0..D {
                        s = _mm512_fmadd_ps(qv[e], _mm512_loadu_ps(kp.add(e * padded + full)), s);
                    }
                    s = _mm512_mask_blend_ps(tail_lanes, neg_inf, s);
                    max = _mm512_max_ps(s, max);
                    _mm512_storeu_ps(sp.add(full), s);
                }
                _mm512_set1_ps(_mm512_reduce_max_ps(max))
            };
            // SAFETY: every load reads 16 lanes below `padded` of the scores or of a value row.
            let (total, acc) = unsafe {
                let mut total = _mm512_setzero_ps();
                let mut acc = [_mm512_setzero_ps(); D];
                let mut j = 0;
                while j < padded {
                    let p = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(sp.add(j)), max));
                    total = _mm512_add_ps(total, p);
                    for e in 0..D {
                        acc[e] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vp.add(e * padded + j)), acc[e]);
                    }
                    j += 16;
                }
                (total, acc)
            };
            let inv = 1.0 / _mm512_reduce_add_ps(total);
            let dst = &mut out[i * c + h * D..i * c + (h + 1) * D];
            for e in 0..D {
                dst[e] = _mm512_reduce_add_ps(acc[e]) * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 256-bit and 512-bit kernels against the portable one, with and without shift regions,
    /// within f32 rounding (their sums run in different orders).
    #[test]
    fn vector_kernels_agree_with_the_portable_kernel() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2 + FMA on this CPU");
            return;
        }
        let wide = std::is_x86_feature_detected!("avx512f");
        let (n, heads, d) = (27, 2, 4);
        let c = heads * d;
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let rows: Vec<f32> = (0..3 * n * c).map(|_| next()).collect();
        let bias: Vec<f32> = (0..heads * n * n).map(|_| next()).collect();
        let regions: Vec<u32> = (0..n as u32).map(|t| t % 3).collect();
        let mut dense = Vec::new();
        let mask = super::super::attention::window_mask(&regions, &mut dense).map(<[f32]>::to_vec);
        for with_regions in [false, true] {
            let r = with_regions.then_some(regions.as_slice());
            let mut buf = HeadScratch::default();
            let mut narrow = vec![0f32; n * c];
            // SAFETY: AVX2 and FMA were detected above.
            unsafe { attend_window::<4>(&rows, n, heads, 0.5, &bias, r, &mut narrow, &mut buf) };
            let mut portable = vec![0f32; n * c];
            let m = if with_regions { mask.as_deref() } else { None };
            super::super::attention::attend_window::<false>(&rows, n, heads, 0.5, &bias, m, &mut portable, &mut buf);
            for (a, b) in narrow.iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
            if wide {
                let mut wide_out = vec![0f32; n * c];
                // SAFETY: AVX-512F was detected above.
                unsafe { attend_window_avx512::<4>(&rows, n, heads, 0.5, &bias, r, &mut wide_out, &mut buf) };
                for (a, b) in wide_out.iter().zip(&portable) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }
}
