//! Window attention with an additive relative-position bias and an optional shift mask.

use candle_core::{Result, Tensor, bail};

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
