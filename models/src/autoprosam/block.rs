//! One encoder block of the 3D-adapted SAM (`Block_3d` of `ImageEncoderViT_3d_v2`): an adapter,
//! (shifted) 3D window attention with decomposed relative position along H, W and the new depth
//! axis, and SAM's MLP. Tokens are channels-last `(B, H, W, D, C)`.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder, linear};

use super::Config;
use crate::ops::resample::{apply_along, linear_matrix};
use crate::ops::window::{compute_shift_mask, roll_spatial, window_partition, window_reverse};
use crate::ops::{channel_layer_norm, depthwise_conv3d};

/// SAM's LayerNorm epsilon.
pub const LN_EPS: f64 = 1e-6;

/// Windows whose scores are computed at once: bounds the `(windows, heads, n, n)` score tensor
/// near 128 MB (ViT-B's 64 windows x 12 heads x 512^2 would be 768 MiB).
const SCORE_CHUNK_ELEMENTS: usize = 1 << 25;

/// `nn.Linear` on a tensor of any rank: the leading axes are flattened (candle's `Linear` takes
/// rank 2 to 4 only).
fn linear_any(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let c = dims[dims.len() - 1];
    let y = layer.forward(&x.reshape((x.elem_count() / c, c))?)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = y.dim(1)?;
    y.reshape(out)
}

/// A LayerNorm over the channels (the differentiable form; see `ops::norm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        channel_layer_norm(x, Some((&self.weight, &self.bias)), self.eps)
    }
}

/// The adapter (keys `linear1`, `conv`, `linear2`): `x + relu(linear2(relu(dwconv(relu(linear1(x))))))`,
/// the depthwise 3x3x3 convolution over (H, W, D).
#[derive(Debug, Clone)]
pub struct Adapter {
    linear1: Linear,
    conv_weight: Tensor,
    conv_bias: Tensor,
    linear2: Linear,
}

impl Adapter {
    pub fn new(dim: usize, mid: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear1: linear(dim, mid, vb.pp("linear1"))?,
            conv_weight: vb.get((mid, 1, 3, 3, 3), "conv.weight")?,
            conv_bias: vb.get(mid, "conv.bias")?,
            linear2: linear(mid, dim, vb.pp("linear2"))?,
        })
    }
}

impl Module for Adapter {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = linear_any(&self.linear1, x)?.relu()?;
        let h = depthwise_conv3d(&h.permute((0, 4, 1, 2, 3))?, &self.conv_weight, Some(&self.conv_bias), 1)?;
        let h = h.permute((0, 2, 3, 4, 1))?.relu()?;
        x + linear_any(&self.linear2, &h)?.relu()?
    }
}

/// SAM's `MLPBlock`: `lin1`, exact GELU, `lin2`.
#[derive(Debug, Clone)]
pub struct Mlp {
    lin1: Linear,
    lin2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { lin1: linear(dim, hidden, vb.pp("lin1"))?, lin2: linear(hidden, dim, vb.pp("lin2"))? })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_any(&self.lin2, &crate::ops::gelu_erf(&linear_any(&self.lin1, x)?)?)
    }
}

/// `get_rel_pos(w, w, table)`: the `(w, w, hd)` relative-position embeddings `R[i, j] =
/// table'[i - j + w - 1]`, where `table'` is `table` linearly interpolated to `2w - 1` rows when
/// it has another length (SAM's tables are sized for its 2D window). The interpolation is a fixed
/// matrix product, so gradients reach the table.
pub fn rel_pos_embeddings(table: &Tensor, window: usize) -> Result<Tensor> {
    let (rows, hd) = table.dims2()?;
    let want = 2 * window - 1;
    let resized = if rows == want {
        table.clone()
    } else {
        let m = linear_matrix(rows, want, false, table.dtype(), table.device())?;
        apply_along(table, 0, &m)?
    };
    let index: Vec<u32> = (0..window).flat_map(|i| (0..window).map(move |j| (i + window - 1 - j) as u32)).collect();
    let index = Tensor::from_vec(index, window * window, table.device())?;
    resized.index_select(&index, 0)?.reshape((window, window, hd))
}

/// `Attention_3d`: multi-head attention inside a cubic window with SAM's decomposed relative
/// position extended to depth (`rel_pos_d`), scaled by the frozen scalar `lr`.
#[derive(Debug, Clone)]
pub struct Attention3d {
    qkv: Linear,
    proj: Linear,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    rel_pos_d: Tensor,
    lr: Tensor,
    heads: usize,
    window: usize,
}

impl Attention3d {
    pub fn new(cfg: &Config, block: usize, vb: VarBuilder) -> Result<Self> {
        let (c, rows, hd) = (cfg.embed_dim, cfg.rel_pos_rows(block), cfg.head_dim());
        Ok(Self {
            qkv: linear(c, 3 * c, vb.pp("qkv"))?,
            proj: linear(c, c, vb.pp("proj"))?,
            rel_pos_h: vb.get((rows, hd), "rel_pos_h")?,
            rel_pos_w: vb.get((rows, hd), "rel_pos_w")?,
            rel_pos_d: vb.get((rows, hd), "rel_pos_d")?,
            lr: vb.get((), "lr")?,
            heads: cfg.num_heads,
            window: cfg.cubic_window,
        })
    }

    /// The additive bias `lr * (rel_h + rel_w + rel_d)` of SAM's `add_decomposed_rel_pos`, `(BH, n, n)`,
    /// from the unscaled queries `q (BH, n, hd)`.
    fn rel_pos_bias(&self, q: &Tensor) -> Result<Tensor> {
        let w = self.window;
        let (bh, n, hd) = q.dims3()?;
        let r_q = q.reshape((bh, w, w, w, hd))?;
        // rel_a[b, x, y, z, k] = sum_c q[b, x, y, z, c] * R_a[pos_a, k, c], pos_a the token's index on axis a.
        let along = |table: &Tensor, axis: usize| -> Result<Tensor> {
            let r = rel_pos_embeddings(table, w)?; // (w, w_k, hd)
            let mut order = vec![axis + 1, 0, 1, 2, 3, 4];
            order.remove(axis + 2);
            let moved = r_q.permute(order.clone())?.contiguous()?.reshape((w, bh * w * w, hd))?;
            let rel = moved.matmul(&r.transpose(1, 2)?.contiguous()?)?; // (w, bh*w*w, w_k)
            let rel = rel.reshape(vec![w, bh, w, w, w])?;
            // Undo the permutation: output position p holds the axis that `order[p]` names.
            let mut inverse = vec![0; 5];
            for (p, &o) in order.iter().enumerate() {
                inverse[o] = p;
            }
            rel.permute(inverse)?.reshape((bh, n, w))
        };
        let rel_h = along(&self.rel_pos_h, 0)?.reshape((bh, n, w, 1, 1))?;
        let rel_w = along(&self.rel_pos_w, 1)?.reshape((bh, n, 1, w, 1))?;
        let rel_d = along(&self.rel_pos_d, 2)?.reshape((bh, n, 1, 1, w))?;
        let sum = rel_h.broadcast_add(&rel_w)?.broadcast_add(&rel_d)?.reshape((bh, n, n))?;
        sum.broadcast_mul(&self.lr)
    }

    /// `x (windows, n, C)`; `mask (nW, n, n)` for shifted windows, window `i` using `mask[i mod nW]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (windows, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let per_image = mask.map(|m| m.dim(0)).transpose()?.unwrap_or(windows);
        if windows % per_image != 0 {
            bail!("attention: {windows} windows are not a multiple of the mask's {per_image}");
        }
        let chunk = (SCORE_CHUNK_ELEMENTS / (self.heads * n * n)).clamp(1, per_image);
        let scale = (hd as f64).powf(-0.5);
        let mut outputs = Vec::new();
        for image_start in (0..windows).step_by(per_image) {
            for start in (0..per_image).step_by(chunk) {
                let len = chunk.min(per_image - start);
                let xc = x.narrow(0, image_start + start, len)?;
                let qkv = linear_any(&self.qkv, &xc)?.reshape((len, n, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?;
                let q = qkv.get(0)?.contiguous()?.reshape((len * self.heads, n, hd))?;
                let k = qkv.get(1)?.contiguous()?.reshape((len * self.heads, n, hd))?;
                let v = qkv.get(2)?.contiguous()?.reshape((len * self.heads, n, hd))?;
                let scores = (&q * scale)?.matmul(&k.t()?)?;
                let mut scores = (scores + self.rel_pos_bias(&q)?)?;
                if let Some(m) = mask {
                    let m = m.narrow(0, start, len)?.unsqueeze(1)?;
                    scores = scores.reshape((len, self.heads, n, n))?.broadcast_add(&m)?.reshape((
                        len * self.heads,
                        n,
                        n,
                    ))?;
                }
                let probs = crate::ops::softmax_last_dim(&scores)?;
                let out = probs.matmul(&v)?.reshape((len, self.heads, n, hd))?.transpose(1, 2)?.reshape((len, n, c))?;
                outputs.push(linear_any(&self.proj, &out)?);
            }
        }
        Tensor::cat(&outputs, 0)
    }
}

/// `Block_3d`: `x = adapter(x)`; `x = x + attn(norm1(x))` in (shifted) windows; `x = x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
pub struct Block3d {
    adapter: Adapter,
    norm1: LayerNorm,
    attn: Attention3d,
    norm2: LayerNorm,
    mlp: Mlp,
    window: usize,
    /// The cyclic shift and its mask, for shifted blocks.
    shift: Option<(usize, Tensor)>,
}

impl Block3d {
    pub fn new(cfg: &Config, index: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.embed_dim;
        let w = cfg.cubic_window;
        let shift = if cfg.shifted(index) {
            let s = w / 2;
            let t = cfg.token_grid();
            let mask = compute_shift_mask([t; 3], [w; 3], [s; 3], vb.device())?.to_dtype(vb.dtype())?;
            Some((s, mask))
        } else {
            None
        };
        Ok(Self {
            adapter: Adapter::new(c, cfg.adapter_dim, vb.pp("adapter"))?,
            norm1: LayerNorm::new(c, LN_EPS, vb.pp("norm1"))?,
            attn: Attention3d::new(cfg, index, vb.pp("attn"))?,
            norm2: LayerNorm::new(c, LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(c, cfg.mlp_ratio * c, vb.pp("mlp"))?,
            window: w,
            shift,
        })
    }

    /// The shifted-window mask `(nW, n, n)` this block adds, if it shifts.
    pub fn shift_mask(&self) -> Option<&Tensor> {
        self.shift.as_ref().map(|(_, m)| m)
    }
}

impl Module for Block3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.adapter.forward(x)?;
        let (_, h, w, d, _) = x.dims5()?;
        let ws = [self.window; 3];
        let mut y = self.norm1.forward(&x)?;
        if let Some((s, _)) = &self.shift {
            let s = *s as i32;
            y = roll_spatial(&y, [-s, -s, -s])?;
        }
        let windows = window_partition(&y, ws)?;
        let attended = self.attn.forward(&windows, self.shift_mask())?;
        let mut y = window_reverse(&attended, ws, [h, w, d])?;
        if let Some((s, _)) = &self.shift {
            let s = *s as i32;
            y = roll_spatial(&y, [s, s, s])?;
        }
        let x = (x + y)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + m
    }
}
