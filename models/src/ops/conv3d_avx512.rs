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
pub(super) struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// The moments of a row, summed in eight f64 lanes (a vector's worth; one lane at a time was
    /// a tenth of the 16-bit kernel's time), then the lanes in order.
    #[inline(always)]
    fn of(values: &[f32]) -> Moments {
        const LANES: usize = 8;
        let n = values.len() as f64;
        let chunks = values.chunks_exact(LANES);
        let rest = chunks.remainder();
        let mut sum = [0f64; LANES];
        for chunk in chunks.clone() {
            for (s, &v) in sum.iter_mut().zip(chunk) {
                *s += v as f64;
            }
        }
        let mean = (sum.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()) / n;
        let mut m2 = [0f64; LANES];
        for chunk in chunks {
            for (s, &v) in m2.iter_mut().zip(chunk) {
                *s += (v as f64 - mean) * (v as f64 - mean);
            }
        }
        let m2 = m2.iter().sum::<f64>() + rest.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>();
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

/// How a convolution's products are computed: what the rings hold and how a block of outputs is
/// summed. [`F32Products`] is the float kernel; [`super::conv3d_int16`] the 16-bit integer one.
pub(super) trait Arithmetic: Sync {
    /// A ring element: one f32 value, or two channels' 16-bit integers.
    type Elem: Copy + Default + Send;
    /// Input channels per ring element.
    const CHANNELS: usize;

    /// Ring values `dst[x]` for input voxels `at + x` of channels `c0..c0 + CHANNELS` of sample
    /// `s` (`sample`: that sample's channels, `channel` values apart).
    ///
    /// # Safety
    /// Called from code compiled for the CPU features the arithmetic needs.
    unsafe fn fill_row(&self, s: usize, c0: usize, sample: &[f32], at: usize, channel: usize, dst: &mut [Self::Elem]);

    /// One output row's voxels `[x0, x0 + 16 * NV)` for output channels `blk * OB..(blk + 1) * OB`
    /// of sample `s`, written at `dst` (channels `spatial` apart; only voxels below `g.out[2]`).
    /// `rings` holds the rows, `slot` the ring offset of each height tap.
    ///
    /// # Safety
    /// The CPU features the arithmetic needs; `dst` writable for the row's voxels below `g.out[2]`
    /// in each of the `OB` channels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const OB: usize, const NV: usize>(
        &self,
        s: usize,
        blk: usize,
        rings: &[Self::Elem],
        layout: &Rings,
        g: &Geometry,
        slot: &[usize],
        x0: usize,
        dst: *mut f32,
        spatial: usize,
    );
}

/// The rings' layout for one convolution.
pub(super) struct Rings {
    /// Elements per ring row: the padded row, rounded up, plus room for a ragged block's loads.
    pub row: usize,
    /// Elements per (channel group, depth tap) ring: `kh` rows.
    pub ring: usize,
}

impl Rings {
    fn of(g: &Geometry) -> Rings {
        let row = (g.w + 2 * g.pad).next_multiple_of(32) + 32 + g.k[2];
        Rings { row, ring: g.k[1] * row }
    }

    /// Copies padded input row `py` (padded coordinates) of plane `z + a` into ring slot `py % kh`
    /// of every (channel group, depth tap) through `arith`'s conversion; zeros outside the input.
    /// A row's padding on either side is never written, so stays zero from the rings' allocation.
    ///
    /// # Safety
    /// The CPU features `arith` needs.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn fill<A: Arithmetic>(
        &self,
        arith: &A,
        s: usize,
        sample: &[f32],
        g: &Geometry,
        z: usize,
        py: usize,
        rings: &mut [A::Elem],
    ) {
        let [kd, kh, _] = g.k;
        let yi = py.wrapping_sub(g.pad);
        let channel = g.d * g.h * g.w;
        let zero = A::Elem::default();
        for group in 0..g.c_in / A::CHANNELS {
            for a in 0..kd {
                let start = (group * kd + a) * self.ring + (py % kh) * self.row;
                let dst = &mut rings[start..start + self.row];
                let zi = (z + a).wrapping_sub(g.pad);
                if zi >= g.d || yi >= g.h {
                    dst[g.pad..g.pad + g.w].fill(zero);
                    continue;
                }
                let at = (zi * g.h + yi) * g.w;
                // SAFETY: the caller's CPU features.
                unsafe { arith.fill_row(s, group * A::CHANNELS, sample, at, channel, &mut dst[g.pad..g.pad + g.w]) };
                // The next output row copies the next input row of these (channel, depth tap)
                // pairs: scattered rows that the hardware prefetchers do not follow.
                for c in group * A::CHANNELS..(group + 1) * A::CHANNELS {
                    let at = c * channel + at;
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
}

/// The float kernel: f32 rings, weights as broadcast operands of f32 multiply-adds.
pub(super) struct F32Products<'a> {
    /// Weights regrouped by channel block, `[block][k][OB]`: a block's broadcasts walk memory.
    packed: Vec<f32>,
    k_len: usize,
    c_in: usize,
    norm: Option<&'a InputNorm<'a>>,
}

impl<'a> F32Products<'a> {
    fn new(weight: &[f32], g: &Geometry, ob: usize, norm: Option<&'a InputNorm<'a>>) -> Self {
        let k_len = g.c_in * g.k.iter().product::<usize>();
        let mut packed = vec![0f32; g.c_out * k_len];
        for (blk, chunk) in packed.chunks_exact_mut(ob * k_len).enumerate() {
            for k in 0..k_len {
                for o in 0..ob {
                    chunk[k * ob + o] = weight[(blk * ob + o) * k_len + k];
                }
            }
        }
        F32Products { packed, k_len, c_in: g.c_in, norm }
    }
}

impl Arithmetic for F32Products<'_> {
    type Elem = f32;
    const CHANNELS: usize = 1;

    #[inline(always)]
    unsafe fn fill_row(&self, s: usize, c0: usize, sample: &[f32], at: usize, channel: usize, dst: &mut [f32]) {
        let row = &sample[c0 * channel + at..][..dst.len()];
        match self.norm {
            None => dst.copy_from_slice(row),
            Some(n) => {
                let (mean, inv_std) = n.stats[s * self.c_in + c0];
                let (m, k, a) = (mean as f32, inv_std as f32, n.slope as f32);
                for (o, &v) in dst.iter_mut().zip(row) {
                    let t = (v - m) * k;
                    *o = if t > a * t { t } else { a * t };
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn block<const OB: usize, const NV: usize>(
        &self,
        _s: usize,
        blk: usize,
        rings: &[f32],
        layout: &Rings,
        g: &Geometry,
        slot: &[usize],
        x0: usize,
        dst: *mut f32,
        spatial: usize,
    ) {
        let [kd, kh, kw] = g.k;
        let weights = &self.packed[blk * OB * self.k_len..(blk + 1) * OB * self.k_len];
        let store_mask = store_masks::<NV>(g.out[2], x0);
        assert!(rings.len() >= g.c_in * kd * layout.ring && x0 + 16 * NV + kw - 1 <= layout.row);
        assert!(slot.len() >= kh);
        // SAFETY: every load reads 16 * NV + kw - 1 values from x0 of a ring row (`row` floats, asserted),
        // inside the rings; weights within their block; the caller guarantees the CPU and `dst`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; OB];
            let mut w = weights.as_ptr();
            for ca in 0..g.c_in * kd {
                let ring = rings.as_ptr().add(ca * layout.ring + x0);
                for &sl in &slot[..kh] {
                    let line = ring.add(sl);
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
}

/// The store masks of a block's `NV` vectors from voxel `x0` of a row of `wo`.
#[inline(always)]
pub(super) fn store_masks<const NV: usize>(wo: usize, x0: usize) -> [__mmask16; NV] {
    let mut masks = [0 as __mmask16; NV];
    for (u, m) in masks.iter_mut().enumerate() {
        let valid = wo.saturating_sub(x0 + 16 * u).min(16);
        *m = ((1u32 << valid) - 1) as __mmask16;
    }
    masks
}

/// Every output row of plane `z` of sample `s`, for every channel block of `OB`, `16 * NV` voxels
/// at a time; `out` points at the sample's output.
///
/// # Safety
/// The CPU features `arith` needs; no other task writes plane `z` of this sample.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn plane<A: Arithmetic, const OB: usize, const NV: usize>(
    arith: &A,
    s: usize,
    sample: &[f32],
    g: &Geometry,
    z: usize,
    rings: &mut [A::Elem],
    out: *mut f32,
    moments: Option<&mut [Moments]>,
) {
    let [od, ho, wo] = g.out;
    let [_, kh, _] = g.k;
    let layout = Rings::of(g);
    let spatial = od * ho * wo;
    // SAFETY (every block below): the caller's guarantees.
    for py in 0..kh - 1 {
        unsafe { layout.fill(arith, s, sample, g, z, py, rings) };
    }
    let mut moments = moments;
    let mut slot = vec![0; kh];
    for y in 0..ho {
        unsafe { layout.fill(arith, s, sample, g, z, y + kh - 1, rings) };
        for (b, sl) in slot.iter_mut().enumerate() {
            *sl = (y + b) % kh * layout.row;
        }
        for blk in 0..g.c_out / OB {
            let mut x0 = 0;
            while x0 < wo {
                // SAFETY: row (z, y) of channels blk * OB.. of this sample.
                unsafe {
                    let dst = out.add(blk * OB * spatial + (z * ho + y) * wo);
                    arith.block::<OB, NV>(s, blk, rings, &layout, g, &slot, x0, dst, spatial);
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

/// [`plane`] for the float kernel, compiled for AVX-512F.
///
/// # Safety
/// As [`plane`], on a CPU with AVX-512F and FMA.
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_f32<const OB: usize, const NV: usize>(
    arith: &F32Products,
    s: usize,
    sample: &[f32],
    g: &Geometry,
    z: usize,
    rings: &mut [f32],
    out: *mut f32,
    moments: Option<&mut [Moments]>,
) {
    // SAFETY: the caller's guarantees, and this function's CPU features.
    unsafe { plane::<_, OB, NV>(arith, s, sample, g, z, rings, out, moments) }
}

/// A plane task of [`run`]: `plane` for one (sample, plane), its channel block and vector count
/// chosen.
pub(super) type PlaneFn<A> =
    unsafe fn(&A, usize, &[f32], &Geometry, usize, &mut [<A as Arithmetic>::Elem], *mut f32, Option<&mut [Moments]>);

/// The output channels per block (12 or 8) for `c_out`, and whether rows take the 32-voxel form.
pub(super) fn blocking(g: &Geometry) -> Option<(usize, bool)> {
    let ob = [12, 8].into_iter().find(|ob| g.c_out.is_multiple_of(*ob))?;
    Some((ob, g.out[2] >= 64 || g.out[2].is_multiple_of(32)))
}

/// Runs `plane_fn` on every (sample, plane) of the output in parallel; the output and, with
/// `moments`, its `(mean, variance)` per (sample, channel), summed plane by plane in order (the
/// same bits whatever the thread count).
///
/// # Safety
/// `plane_fn` is safe to call on this CPU with these arguments.
pub(super) unsafe fn run<A: Arithmetic>(
    arith: &A,
    plane_fn: PlaneFn<A>,
    x: &[f32],
    batch: usize,
    g: &Geometry,
    moments: bool,
) -> (Vec<f32>, Option<super::conv3d::PlaneMoments>) {
    let [od, ho, wo] = g.out;
    let spatial = od * ho * wo;
    let in_len = g.c_in * g.d * g.h * g.w;
    let ring_len = g.c_in / A::CHANNELS * g.k[0] * Rings::of(g).ring;
    // Every voxel is stored by the planes below: no zero fill first.
    let len = batch * g.c_out * spatial;
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // One set of channel moments per (sample, plane) task (filled only when asked for), merged in
    // plane order afterwards.
    let mut per_plane = vec![Moments::default(); batch * od * g.c_out];
    per_plane.par_chunks_mut(g.c_out).enumerate().for_each_init(
        || vec![A::Elem::default(); ring_len],
        |rings, (task, m)| {
            let (s, z) = (task / od, task % od);
            let sample = &x[s * in_len..(s + 1) * in_len];
            let base = &out_ptr;
            // SAFETY: the caller vouches for `plane_fn`; each task writes its own plane of its sample.
            unsafe { plane_fn(arith, s, sample, g, z, rings, base.0.add(s * g.c_out * spatial), moments.then_some(m)) }
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
    (out, stats)
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
    let (ob, wide) = blocking(&g)?;
    assert!(norm.is_none_or(|n| n.stats.len() == batch * g.c_in), "input norm statistics for every (sample, channel)");
    let arith = F32Products::new(weight, &g, ob, norm);
    let plane_fn: PlaneFn<_> = match (ob, wide) {
        (12, true) => plane_f32::<12, 2> as PlaneFn<_>,
        (12, false) => plane_f32::<12, 1> as PlaneFn<_>,
        (_, true) => plane_f32::<8, 2> as PlaneFn<_>,
        (_, false) => plane_f32::<8, 1> as PlaneFn<_>,
    };
    // SAFETY: the caller checked `available`, the features `plane_f32` is compiled for.
    Some(unsafe { run(&arith, plane_fn, x, batch, &g, moments) })
}
