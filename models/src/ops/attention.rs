//! Window attention with an additive relative-position bias and an optional shift mask.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd;

/// Score elements processed at once: windows are taken in chunks so that the `(windows, heads, n, n)`
/// score tensor stays near 128 MB instead of MONAI's 484 MB at stage 1 of a 96^3 window.
const SCORE_CHUNK_ELEMENTS: usize = 1 << 25;

/// `softmax(q k^T + bias [+ mask]) v` per window and head.
///
/// `q`, `k`, `v`: `(B * nW, heads, n, head_dim)`, `q` already scaled; `bias`: `(heads, n, n)`;
/// `mask`: `(nW, n, n)` added to every head of window `i mod nW`. Returns `(B * nW, heads, n, head_dim)`.
pub fn window_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    window_attention_chunked(q, k, v, bias, mask, SCORE_CHUNK_ELEMENTS)
}

/// [`window_attention`] with at most about `max_scores` score elements alive at once (at least one
/// window's worth).
pub fn window_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let (windows, heads, n, _) = q.dims4()?;
    if bias.dims() != [heads, n, n] {
        bail!("window_attention: bias {:?} does not match {heads} heads of {n} tokens", bias.dims());
    }
    let per_image = match mask {
        Some(m) => {
            let nw = m.dim(0)?;
            if m.dims() != [nw, n, n] || windows % nw != 0 {
                bail!("window_attention: mask {:?} does not fit {windows} windows of {n} tokens", m.dims());
            }
            nw
        }
        None => windows,
    };
    let chunk = (max_scores / (heads * n * n)).clamp(1, per_image);
    let bias = bias.unsqueeze(0)?;
    let mut outputs = Vec::with_capacity(windows.div_ceil(chunk));
    for image_start in (0..windows).step_by(per_image) {
        for start in (0..per_image).step_by(chunk) {
            let len = chunk.min(per_image - start);
            let at = image_start + start;
            let qc = q.narrow(0, at, len)?;
            let kc = k.narrow(0, at, len)?;
            let vc = v.narrow(0, at, len)?;
            let mut scores = qc.matmul(&kc.t()?)?.broadcast_add(&bias)?;
            if let Some(m) = mask {
                scores = scores.broadcast_add(&m.narrow(0, start, len)?.unsqueeze(1)?)?;
            }
            let probs = super::softmax_last_dim(&scores)?;
            outputs.push(probs.matmul(&vc.contiguous()?)?);
        }
    }
    if outputs.len() == 1 { Ok(outputs.pop().expect("one chunk")) } else { Tensor::cat(&outputs, 0) }
}

/// Window attention straight from the qkv projection: `qkv (B * nW, n, 3C)` as MONAI lays it out
/// (q, k, v, each split into `heads` of `C / heads`), `q` scaled by `scale`; returns the heads
/// concatenated, `(B * nW, n, C)`, ready for the output projection. `regions (nW, n)` u32 (from
/// [`super::window::compute_shift_regions`]) masks shifted windows: tokens of different regions
/// get -100 added to their score, as MONAI's mask does.
///
/// At inference on the CPU this is one fused kernel per window: scores, bias, mask, softmax and
/// the product with v for one query at a time, without the `(windows, heads, n, n)` score tensor
/// and without the `(nW, n, n)` mask (161 MB at stage 1 of a 96^3 window): a window whose tokens
/// share one region needs none, the others build theirs in a per-thread buffer. While gradients
/// are recorded it is [`window_attention`] on the split heads with the dense mask.
pub fn window_attention_qkv(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bias: &Tensor,
    regions: Option<&Tensor>,
) -> Result<Tensor> {
    let (windows, n, c3) = qkv.dims3()?;
    if c3 % (3 * heads) != 0 {
        bail!("window_attention_qkv: {c3} qkv channels do not split into 3 x {heads} heads");
    }
    if let Some(r) = regions
        && (r.dtype() != DType::U32 || !matches!(*r.dims(), [nw, rn] if rn == n && nw > 0 && windows % nw == 0))
    {
        bail!(
            "window_attention_qkv: regions {:?} {:?} do not fit {windows} windows of {n} tokens",
            r.dims(),
            r.dtype()
        );
    }
    let c = c3 / 3;
    let tracked = qkv.track_op() || bias.track_op();
    let fusable = qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64);
    if fusable && !tracked {
        let op = FusedWindowAttention { heads, scale };
        let qkv = qkv.contiguous()?;
        let bias = bias.to_dtype(qkv.dtype())?.contiguous()?;
        return match regions {
            Some(r) => qkv.apply_op3_no_bwd(&bias, &r.contiguous()?, &op),
            None => qkv.apply_op2_no_bwd(&bias, &op),
        };
    }
    let mask = regions.map(|r| super::window::shift_mask_from_regions(r)?.to_dtype(qkv.dtype())).transpose()?;
    let parts = qkv.reshape((windows, n, 3, heads, c / heads))?.permute((2, 0, 3, 1, 4))?;
    let q = (parts.get(0)? * scale)?;
    let o = window_attention(&q, &parts.get(1)?, &parts.get(2)?, bias, mask.as_ref())?;
    o.transpose(1, 2)?.reshape((windows, n, c))
}

/// A window's token regions when it has more than one (a window of one region is not masked).
fn split_regions(regions: &[u32]) -> Option<&[u32]> {
    let first = *regions.first()?;
    regions.iter().any(|&r| r != first).then_some(regions)
}

/// One window's additive shift mask (`n x n`) from its tokens' regions, written to `mask`; `None`
/// when every token shares one region, where the mask would add only zeros.
pub(super) fn window_mask<'a, T: Copy + From<i8>>(regions: &[u32], mask: &'a mut Vec<T>) -> Option<&'a [T]> {
    let regions = split_regions(regions)?;
    let n = regions.len();
    mask.clear();
    mask.extend(regions.iter().flat_map(|&a| regions.iter().map(move |&b| T::from(if a == b { 0 } else { -100 }))));
    debug_assert_eq!(mask.len(), n * n);
    Some(mask)
}

/// The fused CPU kernel of [`window_attention_qkv`] (forward only).
struct FusedWindowAttention {
    heads: usize,
    scale: f64,
}

/// The f64 kernel: one query at a time, sequential sums. It serves f64 inference (the reference
/// precision of the tests); f32 takes [`fused_attention_f32`].
fn fused_attention_f64(
    qkv: &[f64],
    windows: usize,
    n: usize,
    heads: usize,
    scale: f64,
    bias: &[f64],
    regions: Option<(&[u32], usize)>,
) -> Vec<f64> {
    let c = qkv.len() / (windows * n * 3);
    let d = c / heads;
    let mut out = vec![0.0; windows * n * c];
    out.par_chunks_mut(n * c).enumerate().for_each(|(win, out_w)| {
        let rows = &qkv[win * n * 3 * c..(win + 1) * n * 3 * c];
        let mut scores = vec![0.0; n];
        let mut mask = Vec::new();
        let mask_w = regions.and_then(|(r, nw)| window_mask(&r[(win % nw) * n..(win % nw + 1) * n], &mut mask));
        for h in 0..heads {
            let bias_h = &bias[h * n * n..(h + 1) * n * n];
            for i in 0..n {
                let q = &rows[i * 3 * c + h * d..i * 3 * c + (h + 1) * d];
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &rows[j * 3 * c + c + h * d..j * 3 * c + c + (h + 1) * d];
                    let qk: f64 = q.iter().zip(k).map(|(a, b)| a * scale * b).sum();
                    *s = qk + bias_h[i * n + j] + mask_w.map_or(0.0, |m| m[i * n + j]);
                }
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                scores.iter_mut().for_each(|s| *s = (*s - max).exp());
                let total: f64 = scores.iter().sum();
                for e in 0..d {
                    let o: f64 = scores.iter().enumerate().map(|(j, p)| p * rows[j * 3 * c + 2 * c + h * d + e]).sum();
                    out_w[i * c + h * d + e] = o / total;
                }
            }
        }
    });
    out
}

/// Per-thread buffers of the f32 kernel: one head's keys and values transposed to `(d, n)`, so that
/// every inner loop runs along contiguous tokens, and one query's scores.
#[derive(Default)]
pub(super) struct HeadScratch {
    pub(super) k_t: Vec<f32>,
    pub(super) v_t: Vec<f32>,
    pub(super) scores: Vec<f32>,
}

/// One query's scores `bias + mask + scale q.k` over its `n` keys (`k_t` is `(d, n)`), in one pass
/// over 8-key chunks with the `d` products in registers; returns their maximum.
#[inline(always)]
fn scores_and_max<const FMA: bool>(
    q: &[f32],
    scale: f32,
    k_t: &[f32],
    bias_row: &[f32],
    mask_row: Option<&[f32]>,
    scores: &mut [f32],
) -> f32 {
    use simd::{LANES, madd};
    let n = scores.len();
    let full = n / LANES * LANES;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for j in (0..full).step_by(LANES) {
        let mut s: [f32; LANES] = bias_row[j..j + LANES].try_into().expect("a whole chunk");
        if let Some(m) = mask_row {
            let m: &[f32; LANES] = m[j..j + LANES].try_into().expect("a whole chunk");
            for l in 0..LANES {
                s[l] += m[l];
            }
        }
        for (e, &qe) in q.iter().enumerate() {
            let k: &[f32; LANES] = k_t[e * n + j..e * n + j + LANES].try_into().expect("a whole chunk");
            let qe = qe * scale;
            for l in 0..LANES {
                s[l] = madd::<FMA>(qe, k[l], s[l]);
            }
        }
        for l in 0..LANES {
            lane_max[l] = if s[l] > lane_max[l] { s[l] } else { lane_max[l] };
        }
        scores[j..j + LANES].copy_from_slice(&s);
    }
    let mut max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for j in full..n {
        let mut s = bias_row[j] + mask_row.map_or(0.0, |m| m[j]);
        for (e, &qe) in q.iter().enumerate() {
            s = madd::<FMA>(qe * scale, k_t[e * n + j], s);
        }
        scores[j] = s;
        max = max.max(s);
    }
    max
}

/// One window, every head: for each query, its score row (bias + mask + q.k) is built in a buffer
/// of `n` floats that stays in L1, turned into probabilities in place and multiplied into `v`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_window<const FMA: bool>(
    rows: &[f32],
    n: usize,
    heads: usize,
    scale: f32,
    bias: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
    buf: &mut HeadScratch,
) {
    let c = rows.len() / (3 * n);
    let d = c / heads;
    buf.k_t.resize(d * n, 0.0);
    buf.v_t.resize(d * n, 0.0);
    buf.scores.resize(n, 0.0);
    let HeadScratch { k_t, v_t, scores } = buf;
    for h in 0..heads {
        for (t, row) in rows.chunks_exact(3 * c).enumerate() {
            for e in 0..d {
                k_t[e * n + t] = row[c + h * d + e];
                v_t[e * n + t] = row[2 * c + h * d + e];
            }
        }
        let bias_h = &bias[h * n * n..(h + 1) * n * n];
        for i in 0..n {
            let bias_row = &bias_h[i * n..(i + 1) * n];
            let mask_row = mask.map(|m| &m[i * n..(i + 1) * n]);
            let q = &rows[i * 3 * c + h * d..i * 3 * c + (h + 1) * d];
            let max = scores_and_max::<FMA>(q, scale, k_t, bias_row, mask_row, scores);
            let inv = 1.0 / simd::exp_shifted_sum::<FMA>(scores, max);
            let dst = &mut out[i * c + h * d..i * c + (h + 1) * d];
            for (e, v_row) in v_t.chunks_exact(n).enumerate() {
                dst[e] = simd::dot::<FMA>(scores, v_row) * inv;
            }
        }
    }
}

/// [`attend_window`] compiled for AVX2 + FMA, for head widths without an intrinsics kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn attend_window_avx2(
    rows: &[f32],
    n: usize,
    heads: usize,
    scale: f32,
    bias: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
    buf: &mut HeadScratch,
) {
    attend_window::<true>(rows, n, heads, scale, bias, mask, out, buf)
}

/// The f32 kernel: windows in parallel, each with the kernel for the CPU's vector unit: on AVX2 +
/// FMA the intrinsics kernel for heads of 4 and 8 channels, otherwise [`attend_window`].
fn fused_attention_f32(
    qkv: &[f32],
    windows: usize,
    n: usize,
    heads: usize,
    scale: f32,
    bias: &[f32],
    regions: Option<(&[u32], usize)>,
) -> Vec<f32> {
    let c = qkv.len() / (windows * n * 3);
    let isa = simd::Isa::detect();
    #[cfg(target_arch = "x86_64")]
    let wide = std::is_x86_feature_detected!("avx512f");
    let mut out = vec![0f32; windows * n * c];
    let scratch = || (HeadScratch::default(), Vec::new());
    out.par_chunks_mut(n * c).enumerate().for_each_init(scratch, |(buf, mask), (win, out_w)| {
        let rows = &qkv[win * n * 3 * c..(win + 1) * n * 3 * c];
        let regions_w = regions.and_then(|(r, nw)| split_regions(&r[(win % nw) * n..(win % nw + 1) * n]));
        let portable_mask = |mask| regions_w.and_then(|r| window_mask(r, mask));
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU, and AVX-512F and VL where
            // `wide` is set.
            simd::Isa::Avx2Fma => unsafe {
                use super::attention_avx2::{attend_window, attend_window_avx512};
                match (c / heads, wide) {
                    (4, false) => attend_window::<4>(rows, n, heads, scale, bias, regions_w, out_w, buf),
                    (4, true) => attend_window_avx512::<4>(rows, n, heads, scale, bias, regions_w, out_w, buf),
                    (8, false) => attend_window::<8>(rows, n, heads, scale, bias, regions_w, out_w, buf),
                    (8, true) => attend_window_avx512::<8>(rows, n, heads, scale, bias, regions_w, out_w, buf),
                    _ => attend_window_avx2(rows, n, heads, scale, bias, portable_mask(mask), out_w, buf),
                }
            },
            _ => attend_window::<{ simd::BASELINE_FMA }>(rows, n, heads, scale, bias, portable_mask(mask), out_w, buf),
        }
    });
    out
}

impl FusedWindowAttention {
    fn run(
        &self,
        qkv: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
        regions: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (windows, n, c3) = qkv.1.shape().dims3()?;
        let c = c3 / 3;
        if bias.1.dims() != [self.heads, n, n] {
            bail!("fused window attention: bias {:?} does not match {} heads of {n} tokens", bias.1.dims(), self.heads);
        }
        let slice = |l: &Layout| super::contiguous_range(l, "fused window attention");
        let regions = match regions {
            Some((CpuStorage::U32(r), l)) => {
                let nw = l.dims()[0];
                if l.dims() != [nw, n] || nw == 0 || windows % nw != 0 {
                    bail!("fused window attention: regions {:?} do not fit {windows} windows of {n} tokens", l.dims());
                }
                let (r0, r1) = slice(l)?;
                Some((&r[r0..r1], nw))
            }
            Some(_) => bail!("fused window attention: regions must be u32"),
            None => None,
        };
        let (q0, q1) = slice(qkv.1)?;
        let (b0, b1) = slice(bias.1)?;
        let storage = match (qkv.0, bias.0) {
            (CpuStorage::F32(q), CpuStorage::F32(b)) => CpuStorage::F32(fused_attention_f32(
                &q[q0..q1],
                windows,
                n,
                self.heads,
                self.scale as f32,
                &b[b0..b1],
                regions,
            )),
            (CpuStorage::F64(q), CpuStorage::F64(b)) => CpuStorage::F64(fused_attention_f64(
                &q[q0..q1],
                windows,
                n,
                self.heads,
                self.scale,
                &b[b0..b1],
                regions,
            )),
            _ => bail!("fused window attention: only f32 and f64 of one dtype"),
        };
        Ok((storage, Shape::from((windows, n, c))))
    }
}

impl CustomOp2 for FusedWindowAttention {
    fn name(&self) -> &'static str {
        "prosam-window-attention-cpu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for FusedWindowAttention {
    fn name(&self) -> &'static str {
        "prosam-window-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}
