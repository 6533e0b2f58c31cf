//! The direct convolution kernel of [`super::conv3d_avx512`] in 16-bit integer arithmetic, for int8
//! models on CPUs with AVX-512 VNNI: `vpdpwssd` multiplies 32 pairs of 16-bit integers and adds
//! them into 16 32-bit sums per instruction, twice the multiply-adds of an f32 `vfmadd` (Zen 4:
//! 102 against 54 G/s per core in a register-only loop).
//!
//! The rings hold two input channels per 32-bit element, each activation rounded to a 16-bit
//! integer with a scale per (sample, channel) that maps the channel's largest magnitude to
//! [`ACTIVATION_LEVELS`]; the weights are divided by those scales and rounded per output channel as
//! finely as the 32-bit sums allow without overflow (bounded in [`quantize_weights`]), so each output
//! is an exact integer sum, converted to f32 once. The largest magnitudes come from one pass
//! over the input (its per-plane minimum and maximum, through the pending norm and LeakyReLU,
//! which are monotone). A non-finite input value leaves the call to the float kernel.
//!
//! This is what "int8" buys at SwinUNETR's full resolution: there the weights stay f16 in the model
//! file (int8 weights moved labels most there), and 16-bit activations and weights stay within a
//! few 1e-4 of the output's scale (1.2-3.4e-4 in the tests, where Q8_0 weights give 6e-3) at half
//! the float kernel's instructions.

use std::arch::x86_64::*;

use super::conv3d_avx512::{self as direct, Arithmetic, InputNorm, Moments, PlaneFn, Rings, store_masks};
use super::conv3d_cpu::Geometry;
use rayon::prelude::*;

/// The largest activation magnitude after rounding: 12 bits and a sign. More would leave the
/// weights fewer bits under the 32-bit bound: an output channel's largest weight gets about
/// `2^19 * largest / sum|w|` units (with the activation scales divided in), `2^19 / K` for equal
/// weights (about 800 at SwinUNETR's K = 648 products per output) and more the further the other
/// magnitudes fall below the largest.
pub(super) const ACTIVATION_LEVELS: f32 = 4095.0;

/// Output voxels per sample below which the float kernel serves: the weights are rounded anew on
/// each call (their scales follow the activations'), which costs more than the faster products
/// save on small volumes (SwinUNETR's decoder 5, 384 -> 192 channels at 6^3: 17 against 9 ms).
pub(super) const MIN_VOXELS: usize = 8192;

/// Whether this CPU runs the 16-bit kernel.
pub(super) fn available() -> bool {
    direct::available() && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")
}

/// The 16-bit arithmetic of one call: scales and weights per sample.
struct Int16Products<'a> {
    c_in: usize,
    c_out: usize,
    /// Weight pairs per output channel: `c_in / 2 * taps`.
    k_pairs: usize,
    norm: Option<&'a InputNorm<'a>>,
    /// `round(value * scale)` per (sample, input channel).
    activation_scale: Vec<f32>,
    /// Per sample, by channel block, `[block][k'][OB]`: two input channels' 16-bit weights per
    /// element (the even channel in the low half), `k' = (pair * taps) + tap`.
    packed: Vec<u32>,
    /// The f32 value of one unit of the integer sum, per (sample, output channel).
    unit: Vec<f32>,
}

/// The input's per-(sample, channel) value as the fill computes it, `act((v - mean) * inv_std)` in
/// f32, for a raw value `v`; `v` itself without a norm.
fn normalised(v: f32, norm: Option<(f64, f64, f64)>) -> f32 {
    match norm {
        None => v,
        Some((mean, inv_std, slope)) => {
            let t = (v - mean as f32) * inv_std as f32;
            t.max(slope as f32 * t)
        }
    }
}

/// The minimum and maximum of each `plane`-long plane of `x`, or `None` where a value is not finite.
fn plane_ranges(x: &[f32], plane: usize) -> Option<Vec<(f32, f32)>> {
    x.par_chunks(plane)
        .map(|values| {
            let (mut lo, mut hi, mut poison) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16], [0f32; 16]);
            let mut chunks = values.chunks_exact(16);
            for chunk in &mut chunks {
                for i in 0..16 {
                    lo[i] = if chunk[i] < lo[i] { chunk[i] } else { lo[i] };
                    hi[i] = if chunk[i] > hi[i] { chunk[i] } else { hi[i] };
                    // NaN and infinities turn the product into NaN, which stays.
                    poison[i] += chunk[i] * 0.0;
                }
            }
            let rest = chunks.remainder();
            let lo = lo.iter().chain(rest).fold(f32::INFINITY, |m, &v| m.min(v));
            let hi = hi.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let finite = poison.iter().chain(rest).all(|v| v.is_finite());
            finite.then_some((lo, hi))
        })
        .collect()
}

/// The weights of `weight (c_out, c_in, taps)` for activations scaled by `scale` (per input channel),
/// rounded per output channel; returns the packed pairs (see [`Int16Products::packed`]) and the
/// value of one unit of each output channel's sum.
///
/// The bound: with activations of at most `L = ACTIVATION_LEVELS + 1` in magnitude, an output's
/// integer sum and every partial sum is at most `L * sum|q|`, and rounding adds at most 1/2 per
/// weight, so `sum|q| <= f * sum|w'| + K / 2` with `f` the weights' factor; `f` is the largest that
/// keeps that under `i32::MAX / L` and every weight within 16 bits.
fn quantize_weights(weight: &[f32], g: &Geometry, ob: usize, scale: &[f32], packed: &mut [u32], unit: &mut [f32]) {
    let taps: usize = g.k.iter().product();
    let k_len = g.c_in * taps;
    let k_pairs = k_len / 2;
    let levels = ACTIVATION_LEVELS as f64 + 1.0;
    let mut effective = vec![0f64; k_len];
    let mut q = vec![0i16; k_len];
    for o in 0..g.c_out {
        for (k, e) in effective.iter_mut().enumerate() {
            let s = scale[k / taps] as f64;
            *e = if s > 0.0 { weight[o * k_len + k] as f64 / s } else { 0.0 };
        }
        let largest = effective.iter().fold(0f64, |m, v| m.max(v.abs()));
        let total: f64 = effective.iter().map(|v| v.abs()).sum();
        let factor = if largest > 0.0 {
            (i16::MAX as f64 / largest).min((i32::MAX as f64 / levels - k_len as f64 / 2.0 - 1.0) / total)
        } else {
            0.0
        };
        for (qv, e) in q.iter_mut().zip(&effective) {
            *qv = (e * factor).round_ties_even() as i16;
        }
        unit[o] = if factor > 0.0 { (1.0 / factor) as f32 } else { 0.0 };
        let (blk, lane) = (o / ob, o % ob);
        let block = &mut packed[blk * ob * k_pairs..(blk + 1) * ob * k_pairs];
        for kp in 0..k_pairs {
            let (pair, tap) = (kp / taps, kp % taps);
            let (even, odd) = (q[2 * pair * taps + tap], q[(2 * pair + 1) * taps + tap]);
            block[kp * ob + lane] = even as u16 as u32 | (odd as u16 as u32) << 16;
        }
    }
}

impl<'a> Int16Products<'a> {
    /// The arithmetic for `x (batch, c_in, ...)`; `None` where the input holds a non-finite value.
    fn new(
        x: &[f32],
        weight: &[f32],
        batch: usize,
        g: &Geometry,
        ob: usize,
        norm: Option<&'a InputNorm<'a>>,
    ) -> Option<Self> {
        let ranges = plane_ranges(x, g.d * g.h * g.w)?;
        debug_assert_eq!(ranges.len(), batch * g.c_in);
        let activation_scale: Vec<f32> = ranges
            .iter()
            .enumerate()
            .map(|(sc, &(lo, hi))| {
                let n = norm.map(|n| (n.stats[sc].0, n.stats[sc].1, n.slope));
                let largest = normalised(lo, n).abs().max(normalised(hi, n).abs());
                if largest > 0.0 { ACTIVATION_LEVELS / largest } else { 0.0 }
            })
            .collect();
        if !activation_scale.iter().all(|s| s.is_finite()) {
            return None;
        }
        let k_pairs = g.c_in / 2 * g.k.iter().product::<usize>();
        let mut packed = vec![0u32; batch * g.c_out * k_pairs];
        let mut unit = vec![0f32; batch * g.c_out];
        for s in 0..batch {
            quantize_weights(
                weight,
                g,
                ob,
                &activation_scale[s * g.c_in..(s + 1) * g.c_in],
                &mut packed[s * g.c_out * k_pairs..(s + 1) * g.c_out * k_pairs],
                &mut unit[s * g.c_out..(s + 1) * g.c_out],
            );
        }
        Some(Int16Products { c_in: g.c_in, c_out: g.c_out, k_pairs, norm, activation_scale, packed, unit })
    }
}

impl Arithmetic for Int16Products<'_> {
    type Elem = u32;
    const CHANNELS: usize = 2;

    #[inline(always)]
    unsafe fn fill_row(&self, s: usize, c0: usize, sample: &[f32], at: usize, channel: usize, dst: &mut [u32]) {
        let w = dst.len();
        let rows = [&sample[c0 * channel + at..][..w], &sample[(c0 + 1) * channel + at..][..w]];
        // Without a norm: (v - 0) * 1, then max(t, 1 * t): the value itself.
        let params = |c: usize| {
            let (m, k, a) = match self.norm {
                Some(n) => (n.stats[s * self.c_in + c].0 as f32, n.stats[s * self.c_in + c].1 as f32, n.slope as f32),
                None => (0.0, 1.0, 1.0),
            };
            (m, k, a, self.activation_scale[s * self.c_in + c])
        };
        // SAFETY: masked loads and stores within the rows and `dst` (w values each); the caller's
        // CPU features (AVX-512F).
        unsafe {
            let mut quantize = [_mm512_setzero_si512(); 2];
            let consts = [params(c0), params(c0 + 1)].map(|(m, k, a, scale)| {
                (_mm512_set1_ps(m), _mm512_set1_ps(k), _mm512_set1_ps(a), _mm512_set1_ps(scale))
            });
            let low = _mm512_set1_epi32(0xffff);
            let mut x = 0;
            while x < w {
                let mask = ((1u32 << (w - x).min(16)) - 1) as __mmask16;
                for (i, (m, k, a, scale)) in consts.iter().enumerate() {
                    let v = _mm512_maskz_loadu_ps(mask, rows[i].as_ptr().add(x));
                    let t = _mm512_mul_ps(_mm512_sub_ps(v, *m), *k);
                    let t = _mm512_max_ps(t, _mm512_mul_ps(*a, t));
                    quantize[i] = _mm512_cvtps_epi32(_mm512_mul_ps(t, *scale));
                }
                let pair = _mm512_or_si512(_mm512_and_si512(quantize[0], low), _mm512_slli_epi32::<16>(quantize[1]));
                _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(x).cast(), mask, pair);
                x += 16;
            }
        }
    }

    #[inline(always)]
    unsafe fn block<const OB: usize, const NV: usize>(
        &self,
        s: usize,
        blk: usize,
        rings: &[u32],
        layout: &Rings,
        g: &Geometry,
        slot: &[usize],
        x0: usize,
        dst: *mut f32,
        spatial: usize,
    ) {
        let [kd, kh, kw] = g.k;
        let first = s * self.c_out + blk * OB;
        let weights = &self.packed[first * self.k_pairs..(first + OB) * self.k_pairs];
        let unit = &self.unit[first..first + OB];
        let store_mask = store_masks::<NV>(g.out[2], x0);
        assert!(rings.len() >= g.c_in / 2 * kd * layout.ring && x0 + 16 * NV + kw - 1 <= layout.row);
        assert!(slot.len() >= kh && weights.len() == OB * g.c_in / 2 * kd * kh * kw);
        // SAFETY: every load reads 16 * NV + kw - 1 elements from x0 of a ring row (`row`
        // elements, asserted), inside the rings; weights within their block (asserted); the
        // caller guarantees the CPU (AVX-512 VNNI) and `dst`.
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); NV]; OB];
            let mut w = weights.as_ptr();
            for pa in 0..g.c_in / 2 * kd {
                let ring = rings.as_ptr().add(pa * layout.ring + x0);
                for &sl in &slot[..kh] {
                    let line = ring.add(sl);
                    for e in 0..kw {
                        let mut v = [_mm512_setzero_si512(); NV];
                        for u in 0..NV {
                            v[u] = _mm512_loadu_si512(line.add(e + 16 * u).cast());
                        }
                        for o in 0..OB {
                            let wo = _mm512_set1_epi32(*w.add(o) as i32);
                            for u in 0..NV {
                                acc[o][u] = _mm512_dpwssd_epi32(acc[o][u], v[u], wo);
                            }
                        }
                        w = w.add(OB);
                    }
                }
            }
            for (o, a) in acc.iter().enumerate() {
                let scale = _mm512_set1_ps(unit[o]);
                for u in 0..NV {
                    let y = _mm512_mul_ps(_mm512_cvtepi32_ps(a[u]), scale);
                    _mm512_mask_storeu_ps(dst.add(o * spatial + x0 + 16 * u), store_mask[u], y);
                }
            }
        }
    }
}

/// [`direct`]'s plane for the 16-bit arithmetic, compiled for AVX-512 VNNI.
///
/// # Safety
/// As that plane, on a CPU with AVX-512F, BW and VNNI.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_int16<const OB: usize, const NV: usize>(
    arith: &Int16Products,
    s: usize,
    sample: &[f32],
    g: &Geometry,
    z: usize,
    rings: &mut [u32],
    out: *mut f32,
    moments: Option<&mut [Moments]>,
) {
    // SAFETY: the caller's guarantees, and this function's CPU features.
    unsafe { direct::plane::<_, OB, NV>(arith, s, sample, g, z, rings, out, moments) }
}

/// [`direct::conv`] in 16-bit integer arithmetic; `None` where the float kernel must serve the
/// call: output channels in neither 12s nor 8s, an odd number of input channels, fewer than
/// [`MIN_VOXELS`] output voxels per sample, or a non-finite input value.
pub(crate) fn conv(
    x: &[f32],
    weight: &[f32],
    batch: usize,
    g: Geometry,
    norm: Option<&InputNorm>,
    moments: bool,
) -> Option<(Vec<f32>, Option<super::conv3d::PlaneMoments>)> {
    let (ob, wide) = direct::blocking(&g)?;
    if !g.c_in.is_multiple_of(2) || g.out.iter().product::<usize>() < MIN_VOXELS {
        return None;
    }
    assert!(norm.is_none_or(|n| n.stats.len() == batch * g.c_in), "input norm statistics for every (sample, channel)");
    let arith = Int16Products::new(x, weight, batch, &g, ob, norm)?;
    let plane_fn: PlaneFn<_> = match (ob, wide) {
        (12, true) => plane_int16::<12, 2> as PlaneFn<_>,
        (12, false) => plane_int16::<12, 1> as PlaneFn<_>,
        (_, true) => plane_int16::<8, 2> as PlaneFn<_>,
        (_, false) => plane_int16::<8, 1> as PlaneFn<_>,
    };
    // SAFETY: the caller checked `available`, the features `plane_int16` is compiled for.
    Some(unsafe { direct::run(&arith, plane_fn, x, batch, &g, moments) })
}
