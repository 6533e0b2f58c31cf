//! A direct f32 kernel for the stride-1 3D convolution on x86-64 with AVX-512F (Zen 4 and later,
//! Intel since Skylake-SP): blocks of 12 (or 8) output channels by 32 voxels of one output row
//! (16 where rows are short or would leave half a block empty), held in 24 of the 32 512-bit
//! registers, each weight a broadcast operand of its multiply-adds. The same kernel with 256-bit
//! vectors (12 x 16 voxels) ran at 64 % of this machine's FMA peak, the 512-bit one at about
//! three quarters: half the instructions for the same work.
//!
//! Input rows come from a small ring per (channel, depth tap): the zero-padded rows the current
//! output row reads, one new row copied in per output row, so every input value is copied `kd`
//! times (the line-buffer + gemm kernel copied it `kd * kh` times and the gemm crate packed it
//! again; its 16 x 6 AVX2 microkernel ran at about half the FMA units' peak on SwinUNETR's 12-48
//! output channels). Reading the input in place instead was slower: a 3^3 tap's rows lie whole
//! planes and channels apart, multiples of 4 KiB at 96^3, and evict each other from the caches.
//!
//! For a UnetResBlock at inference the kernel also takes over the instance norm's memory passes
//! (a 12-channel 96^3 activation is 42 MB, more than the last-level cache): it can normalise and
//! activate its input while copying rows into the rings ([`InputNorm`]), and return its output's
//! per-channel mean and variance, taken from each row while it is still in the cache.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::conv3d_cpu::{Geometry, SendPtr};

/// Whether this CPU runs the kernel.
pub(super) fn available() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
}

/// The instance norm and LeakyReLU of the convolution's input, applied as rows are read:
/// `act((v - mean) * inv_std)` per (sample, channel), in f32 as the instance norm kernel computes it.
pub(crate) struct InputNorm<'a> {
    /// `(mean, inv_std)` per (sample, input channel).
    pub stats: &'a [(f64, f64)],
    pub slope: f64,
}

/// A running count, mean and sum of squared deviations (Chan et al.'s pairwise update).
#[derive(Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn of(values: &[f32]) -> Moments {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let m2 = values.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum();
        Moments { n, mean, m2 }
    }

    fn merge(self, other: Moments) -> Moments {
        if self.n == 0.0 {
            return other;
        }
        let n = self.n + other.n;
        let delta = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + delta * other.n / n,
            m2: self.m2 + other.m2 + delta * delta * self.n * other.n / n,
        }
    }
}

/// The rings' layout for one convolution.
struct Rings {
    /// Floats per ring row: the padded row, rounded up, plus room for a ragged block's loads.
    row: usize,
    /// Floats per (channel, depth tap) ring: `kh` rows.
    ring: usize,
}

impl Rings {
    fn of(g: &Geometry) -> Rings {
        let row = (g.w + 2 * g.pad).next_multiple_of(32) + 32 + g.k[2];
        Rings { row, ring: g.k[1] * row }
    }

    /// Copies padded input row `py` (padded coordinates) of plane `z + a` into ring slot `py % kh`
    /// of every (channel, depth tap); zeros outside the input.
    /// `norm`: the sample's `(mean, inv_std)` per channel and the slope, applied to the copied values.
    fn fill(
        &self,
        sample: &[f32],
        g: &Geometry,
        z: usize,
        py: usize,
        rings: &mut [f32],
        norm: Option<(&[(f64, f64)], f64)>,
    ) {
        let [kd, kh, _] = g.k;
        let yi = py.wrapping_sub(g.pad);
        for c in 0..g.c_in {
            for a in 0..kd {
                let start = (c * kd + a) * self.ring + (py % kh) * self.row;
                let dst = &mut rings[start..start + self.row];
                let zi = (z + a).wrapping_sub(g.pad);
                if zi >= g.d || yi >= g.h {
                    dst.fill(0.0);
                    continue;
                }
                let at = ((c * g.d + zi) * g.h + yi) * g.w;
                dst[..g.pad].fill(0.0);
                let row = &sample[at..at + g.w];
                match norm {
                    None => dst[g.pad..g.pad + g.w].copy_from_slice(row),
                    Some((stats, slope)) => {
                        let (m, s, a) = (stats[c].0 as f32, stats[c].1 as f32, slope as f32);
                        for (o, &v) in dst[g.pad..g.pad + g.w].iter_mut().zip(row) {
                            let t = (v - m) * s;
                            *o = if t > a * t { t } else { a * t };
                        }
                    }
                }
                dst[g.pad + g.w..].fill(0.0);
                // The next output row copies the next input row of these (channel, depth tap)
                // pairs: scattered rows that the hardware prefetchers do not follow.
                if let Some(next) = sample.get(at + g.w..at + 2 * g.w) {
                    for line in next.chunks(16) {
                        // SAFETY: a prefetch of memory inside `sample`.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
                    }
                }
            }
        }
    }
}

/// One output row's voxels `[x0, x0 + 16 * NV)` for `OB` output channels starting at `dst`
/// (channels `spatial` apart; only voxels below `wo` are written). `rings` holds the rows, `slot`
/// the ring offset of height tap `b`; `weights` the channel block's packed weights `[k][OB]`,
/// `k = ((c * kd + a) * kh + b) * kw + e`.
///
/// # Safety
/// AVX-512F and FMA; `dst` writable for the row's voxels below `wo` in each of the `OB` channels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const OB: usize, const NV: usize>(
    rings: &[f32],
    layout: &Rings,
    g: &Geometry,
    slot: &[usize],
    x0: usize,
    weights: &[f32],
    dst: *mut f32,
    spatial: usize,
) {
    let [kd, kh, kw] = g.k;
    let wo = g.out[2];
    let mut store_mask = [0 as __mmask16; NV];
    for (u, m) in store_mask.iter_mut().enumerate() {
        let valid = wo.saturating_sub(x0 + 16 * u).min(16);
        *m = ((1u32 << valid) - 1) as __mmask16;
    }
    assert!(rings.len() >= g.c_in * kd * layout.ring && x0 + 16 * NV + kw - 1 <= layout.row);
    assert!(weights.len() >= g.c_in * kd * kh * kw * OB && slot.len() >= kh);
    // SAFETY: every load reads 16 * NV + kw - 1 values from x0 of a ring row (`row` floats, asserted),
    // inside the rings; weights within the asserted length; the caller guarantees the CPU and `dst`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; OB];
        let mut w = weights.as_ptr();
        for ca in 0..g.c_in * kd {
            let ring = rings.as_ptr().add(ca * layout.ring + x0);
            for &s in &slot[..kh] {
                let line = ring.add(s);
                for e in 0..kw {
                    let mut v = [_mm512_setzero_ps(); NV];
                    for u in 0..NV {
                        v[u] = _mm512_loadu_ps(line.add(e + 16 * u));
                    }
                    for o in 0..OB {
                        let wo = _mm512_set1_ps(*w.add(o));
                        for u in 0..NV {
                            acc[o][u] = _mm512_fmadd_ps(wo, v[u], acc[o][u]);
                        }
                    }
                    w = w.add(OB);
                }
            }
        }
        for (o, a) in acc.iter().enumerate() {
            for u in 0..NV {
                _mm512_mask_storeu_ps(dst.add(o * spatial + x0 + 16 * u), store_mask[u], a[u]);
            }
        }
    }
}

/// Every output row of plane `z` of one sample, for every channel block of `OB`, `16 * NV` voxels
/// at a time; `out` points at the sample's output.
///
/// # Safety
/// AVX-512F and FMA; no other task writes plane `z` of this sample.
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane<const OB: usize, const NV: usize>(
    sample: &[f32],
    g: &Geometry,
    packed: &[f32],
    z: usize,
    rings: &mut [f32],
    out: *mut f32,
    norm: Option<(&[(f64, f64)], f64)>,
    moments: Option<&mut [Moments]>,
) {
    let [od, ho, wo] = g.out;
    let [_, kh, _] = g.k;
    let layout = Rings::of(g);
    let spatial = od * ho * wo;
    let k_len = g.c_in * g.k.iter().product::<usize>();
    for py in 0..kh - 1 {
        layout.fill(sample, g, z, py, rings, norm);
    }
    let mut moments = moments;
    let mut slot = vec![0; kh];
    for y in 0..ho {
        layout.fill(sample, g, z, y + kh - 1, rings, norm);
        for (b, s) in slot.iter_mut().enumerate() {
            *s = (y + b) % kh * layout.row;
        }
        for blk in 0..g.c_out / OB {
            let weights = &packed[blk * OB * k_len..(blk + 1) * OB * k_len];
            let mut x0 = 0;
            while x0 < wo {
                // SAFETY: the caller's guarantees; row (z, y) of channels blk * OB.. of this sample.
                unsafe {
                    let dst = out.add(blk * OB * spatial + (z * ho + y) * wo);
                    block::<OB, NV>(rings, &layout, g, &slot, x0, weights, dst, spatial);
                }
                x0 += 16 * NV;
            }
            if let Some(m) = moments.as_deref_mut() {
                for o in 0..OB {
                    // SAFETY: the row was just written above (wo values of channel blk * OB + o).
                    let row = unsafe {
                        std::slice::from_raw_parts(out.add((blk * OB + o) * spatial + (z * ho + y) * wo), wo)
                    };
                    m[blk * OB + o] = m[blk * OB + o].merge(Moments::of(row));
                }
            }
        }
    }
}

/// The convolution of `x (batch, c_in, d, h, w)` with `weight (c_out, c_in, kd, kh, kw)`, or `None`
/// where the output channels come in neither 12s nor 8s (the gemm kernel serves those). With
/// `norm`, the input is normalised and activated as it is read; with `moments`, the output's
/// `(mean, variance)` per (sample, channel) come back too, summed plane by plane in order (the
/// same bits whatever the thread count).
pub(crate) fn conv(
    x: &[f32],
    weight: &[f32],
    batch: usize,
    g: Geometry,
    norm: Option<&InputNorm>,
    moments: bool,
) -> Option<(Vec<f32>, Option<super::conv3d::PlaneMoments>)> {
    let ob = [12, 8].into_iter().find(|ob| g.c_out.is_multiple_of(*ob))?;
    assert!(norm.is_none_or(|n| n.stats.len() == batch * g.c_in), "input norm statistics for every (sample, channel)");
    let [od, ho, wo] = g.out;
    let k_len = g.c_in * g.k.iter().product::<usize>();
    // Weights regrouped by channel block, [block][k][ob]: a block's broadcasts walk memory.
    let mut packed = vec![0f32; g.c_out * k_len];
    for (blk, chunk) in packed.chunks_exact_mut(ob * k_len).enumerate() {
        for k in 0..k_len {
            for o in 0..ob {
                chunk[k * ob + o] = weight[(blk * ob + o) * k_len + k];
            }
        }
    }
    let spatial = od * ho * wo;
    let in_len = g.c_in * g.d * g.h * g.w;
    let ring_len = g.c_in * g.k[0] * Rings::of(&g).ring;
    // Every voxel is stored by the planes below: no zero fill first.
    let len = batch * g.c_out * spatial;
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // One set of channel moments per (sample, plane) task (filled only when asked for), merged in
    // plane order afterwards.
    let mut per_plane = vec![Moments::default(); batch * od * g.c_out];
    per_plane.par_chunks_mut(g.c_out).enumerate().for_each_init(
        || vec![0f32; ring_len],
        |rings, (task, m)| {
            let (s, z) = (task / od, task % od);
            let sample = &x[s * in_len..(s + 1) * in_len];
            let norm = norm.map(|n| (&n.stats[s * g.c_in..(s + 1) * g.c_in], n.slope));
            let m = moments.then_some(m);
            let base = &out_ptr;
            // SAFETY: the caller checked `available`; each task writes its own plane of its sample.
            unsafe {
                let out = base.0.add(s * g.c_out * spatial);
                match (ob, wo >= 64 || wo.is_multiple_of(32)) {
                    (12, true) => plane::<12, 2>(sample, &g, &packed, z, rings, out, norm, m),
                    (12, false) => plane::<12, 1>(sample, &g, &packed, z, rings, out, norm, m),
                    (_, true) => plane::<8, 2>(sample, &g, &packed, z, rings, out, norm, m),
                    (_, false) => plane::<8, 1>(sample, &g, &packed, z, rings, out, norm, m),
                }
            }
        },
    );
    // SAFETY: the tasks stored every voxel of every channel of every sample's planes.
    unsafe { out.set_len(len) };
    let stats = moments.then(|| {
        (0..batch * g.c_out)
            .map(|sc| {
                let (s, c) = (sc / g.c_out, sc % g.c_out);
                let m = (0..od).fold(Moments::default(), |acc, z| acc.merge(per_plane[(s * od + z) * g.c_out + c]));
                (m.mean, m.m2 / m.n)
            })
            .collect()
    });
    Some((out, stats))
}
