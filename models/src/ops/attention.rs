//! Window attention with an additive relative-position bias and an optional shift mask.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use num_traits::Float;
use rayon::prelude::*;

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
/// concatenated, `(B * nW, n, C)`, ready for the output projection.
///
/// At inference on the CPU this is one fused kernel per window: scores, bias, mask, softmax and
/// the product with v for one query at a time, without the `(windows, heads, n, n)` score tensor.
/// While gradients are recorded it is [`window_attention`] on the split heads.
pub fn window_attention_qkv(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (windows, n, c3) = qkv.dims3()?;
    if c3 % (3 * heads) != 0 {
        bail!("window_attention_qkv: {c3} qkv channels do not split into 3 x {heads} heads");
    }
    let c = c3 / 3;
    let tracked = qkv.track_op() || bias.track_op() || mask.is_some_and(|m| m.track_op());
    let fusable = qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64);
    if fusable && !tracked {
        let op = FusedWindowAttention { heads, scale };
        let qkv = qkv.contiguous()?;
        let bias = bias.to_dtype(qkv.dtype())?.contiguous()?;
        return match mask {
            Some(m) => qkv.apply_op3_no_bwd(&bias, &m.to_dtype(qkv.dtype())?.contiguous()?, &op),
            None => qkv.apply_op2_no_bwd(&bias, &op),
        };
    }
    let parts = qkv.reshape((windows, n, 3, heads, c / heads))?.permute((2, 0, 3, 1, 4))?;
    let q = (parts.get(0)? * scale)?;
    let o = window_attention(&q, &parts.get(1)?, &parts.get(2)?, bias, mask)?;
    o.transpose(1, 2)?.reshape((windows, n, c))
}

/// The fused CPU kernel of [`window_attention_qkv`] (forward only).
struct FusedWindowAttention {
    heads: usize,
    scale: f64,
}

fn fused_attention<T: Float + Send + Sync>(
    qkv: &[T],
    windows: usize,
    n: usize,
    heads: usize,
    scale: T,
    bias: &[T],
    mask: Option<(&[T], usize)>,
) -> Vec<T> {
    let c = qkv.len() / (windows * n * 3);
    let d = c / heads;
    let mut out = vec![T::zero(); windows * n * c];
    out.par_chunks_mut(n * c).enumerate().for_each(|(win, out_w)| {
        let rows = &qkv[win * n * 3 * c..(win + 1) * n * 3 * c];
        let mut k_t = vec![T::zero(); d * n];
        let mut v = vec![T::zero(); n * d];
        let mut scores = vec![T::zero(); n];
        let mut acc = vec![T::zero(); d];
        let mask_w = mask.map(|(m, nw)| &m[(win % nw) * n * n..(win % nw + 1) * n * n]);
        for h in 0..heads {
            // k transposed (d x n) so that the score loop runs along contiguous keys.
            for t in 0..n {
                for e in 0..d {
                    k_t[e * n + t] = rows[t * 3 * c + c + h * d + e];
                    v[t * d + e] = rows[t * 3 * c + 2 * c + h * d + e];
                }
            }
            let bias_h = &bias[h * n * n..(h + 1) * n * n];
            for i in 0..n {
                scores.copy_from_slice(&bias_h[i * n..(i + 1) * n]);
                if let Some(m) = mask_w {
                    for (s, mv) in scores.iter_mut().zip(&m[i * n..(i + 1) * n]) {
                        *s = *s + *mv;
                    }
                }
                for e in 0..d {
                    let qe = rows[i * 3 * c + h * d + e] * scale;
                    for (s, kv) in scores.iter_mut().zip(&k_t[e * n..(e + 1) * n]) {
                        *s = *s + qe * *kv;
                    }
                }
                let max = scores.iter().fold(T::neg_infinity(), |m, &s| m.max(s));
                let mut total = T::zero();
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total = total + *s;
                }
                acc.iter_mut().for_each(|a| *a = T::zero());
                for (p, vt) in scores.iter().zip(v.chunks_exact(d)) {
                    for (a, ve) in acc.iter_mut().zip(vt) {
                        *a = *a + *p * *ve;
                    }
                }
                for (o, a) in out_w[i * c + h * d..i * c + (h + 1) * d].iter_mut().zip(&acc) {
                    *o = *a / total;
                }
            }
        }
    });
    out
}

impl FusedWindowAttention {
    fn run(
        &self,
        qkv: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (windows, n, c3) = qkv.1.shape().dims3()?;
        let c = c3 / 3;
        if bias.1.dims() != [self.heads, n, n] {
            bail!("fused window attention: bias {:?} does not match {} heads of {n} tokens", bias.1.dims(), self.heads);
        }
        let nw = match mask {
            Some((_, l)) => {
                let nw = l.dims()[0];
                if l.dims() != [nw, n, n] || windows % nw != 0 {
                    bail!("fused window attention: mask {:?} does not fit {windows} windows of {n} tokens", l.dims());
                }
                nw
            }
            None => 1,
        };
        let slice = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("fused window attention: inputs must be contiguous".into()))
        };
        let (q0, q1) = slice(qkv.1)?;
        let (b0, b1) = slice(bias.1)?;
        let mask_range = mask.map(|(_, l)| slice(l)).transpose()?;
        let storage = match (qkv.0, bias.0) {
            (CpuStorage::F32(q), CpuStorage::F32(b)) => {
                let m = match (mask, mask_range) {
                    (Some((CpuStorage::F32(m), _)), Some((m0, m1))) => Some((&m[m0..m1], nw)),
                    (None, _) => None,
                    _ => bail!("fused window attention: mask dtype differs"),
                };
                CpuStorage::F32(fused_attention(&q[q0..q1], windows, n, self.heads, self.scale as f32, &b[b0..b1], m))
            }
            (CpuStorage::F64(q), CpuStorage::F64(b)) => {
                let m = match (mask, mask_range) {
                    (Some((CpuStorage::F64(m), _)), Some((m0, m1))) => Some((&m[m0..m1], nw)),
                    (None, _) => None,
                    _ => bail!("fused window attention: mask dtype differs"),
                };
                CpuStorage::F64(fused_attention(&q[q0..q1], windows, n, self.heads, self.scale, &b[b0..b1], m))
            }
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
