//! The teacher's image encoder (`ImageEncoderViT_3d_v2`): SAM's 2D patch embedding applied to
//! slices of the up-sampled crop, a depthwise slice embedding that folds `patch` slices into one
//! token, SAM's position embedding plus a depth embedding, the 3D blocks, and a neck per tap.
//!
//! Axes: the crop is `(B, 1, X, Y, Z)`; the token grid is `(B, H, W, D, C)` = `(Y, Z, X)`; the taps
//! are channels-first `(B, out_chans, H, W, D)`.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::Config;
use super::block::{Block3d, LN_EPS, LayerNorm};
use crate::ops::conv3d;
use crate::ops::resample::{apply_along, linear_matrix, linear_weights};

/// Elements of patch-embedding output computed at once: the up-sampled ViT-B crop is 512^3 (1.5 GiB
/// in three channels), so slices are embedded a few tokens of depth at a time.
const EMBED_CHUNK_ELEMENTS: usize = 1 << 24;

/// `neck_3d[k]`: 1x1x1 convolution (no bias), LayerNorm3d, 3x3x3 convolution (no bias), LayerNorm3d.
#[derive(Debug, Clone)]
pub struct Neck3d {
    conv1: Tensor,
    norm1: LayerNorm,
    conv2: Tensor,
    norm2: LayerNorm,
}

impl Neck3d {
    pub fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: vb.get((out, dim, 1, 1, 1), "0.weight")?,
            norm1: LayerNorm::new(out, LN_EPS, vb.pp("1"))?,
            conv2: vb.get((out, out, 3, 3, 3), "2.weight")?,
            norm2: LayerNorm::new(out, LN_EPS, vb.pp("3"))?,
        })
    }
}

impl Module for Neck3d {
    /// Channels-last tokens `(B, H, W, D, C)` in, channels-first `(B, out, H, W, D)` out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, d, dim) = x.dims5()?;
        let out = self.conv1.dim(0)?;
        let y = x.reshape((b * h * w * d, dim))?.matmul(&self.conv1.reshape((out, dim))?.t()?)?;
        let y = y.reshape((b, h, w, d, out))?;
        let y = self.norm1.forward(&y)?.permute((0, 4, 1, 2, 3))?;
        let y = conv3d(&y, &self.conv2, None, 1, 1)?.permute((0, 2, 3, 4, 1))?;
        self.norm2.forward(&y)?.permute((0, 4, 1, 2, 3))?.contiguous()
    }
}

#[derive(Debug, Clone)]
pub struct ImageEncoder3d {
    cfg: Config,
    /// SAM's patch embedding with its three (identical) input channels summed: `(C, patch^2)`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// The slice embedding as `(patch, C)`: weight of slice `k` of a token for channel `c`.
    slice_weight: Tensor,
    slice_bias: Tensor,
    pos_embed: Tensor,
    depth_embed: Tensor,
    blocks: Vec<Block3d>,
    necks: Vec<Neck3d>,
}

impl ImageEncoder3d {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (c, p, t, g) = (cfg.embed_dim, cfg.patch, cfg.token_grid(), cfg.position_grid());
        // The three input channels are the same image repeated, so one channel with the summed
        // weight computes the same convolution at a third of the cost (spec section 2.1).
        let patch_weight = vb.get((c, 3, p, p), "patch_embed.proj.weight")?.sum(1)?.reshape((c, p * p))?;
        let slice_weight = vb.get((c, 1, 1, 1, p), "slice_embed.weight")?.reshape((c, p))?.t()?;
        let blocks =
            (0..cfg.depth).map(|i| Block3d::new(cfg, i, vb.pp(format!("blocks.{i}")))).collect::<Result<_>>()?;
        let necks =
            (0..4).map(|k| Neck3d::new(c, cfg.out_chans, vb.pp(format!("neck_3d.{k}")))).collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias: vb.get(c, "patch_embed.proj.bias")?,
            slice_weight,
            slice_bias: vb.get(c, "slice_embed.bias")?,
            pos_embed: vb.get((1, g, g, c), "pos_embed")?,
            depth_embed: vb.get((1, t, c), "depth_embed")?,
            blocks,
            necks,
        })
    }

    pub fn blocks(&self) -> &[Block3d] {
        &self.blocks
    }

    pub fn necks(&self) -> &[Neck3d] {
        &self.necks
    }

    /// The crop `(1, 1, X, Y, Z)` up-sampled along Y and Z: `(X, upsample*Y, upsample*Z)`. The X axis
    /// is up-sampled slice by slice in [`Self::embed_slices`].
    fn upsample_yz(&self, x: &Tensor) -> Result<Tensor> {
        let (b, ch, sx, sy, sz) = x.dims5()?;
        let crop = self.cfg.crop;
        if b != 1 || ch != 1 || (sx, sy, sz) != (crop, crop, crop) {
            bail!("the teacher takes one 1-channel {crop}^3 crop, not {:?}", x.dims());
        }
        let up = self.cfg.upsample;
        let x = x.reshape((sx, sy, sz))?;
        let my = linear_matrix(sy, up * sy, false, x.dtype(), x.device())?;
        let mz = linear_matrix(sz, up * sz, false, x.dtype(), x.device())?;
        apply_along(&apply_along(&x, 1, &my)?, 2, &mz)
    }

    /// SAM's patch embedding of up-sampled slices `rows` (along X), `(slices, Ty, Tz, C)`, from the
    /// Y/Z-up-sampled crop. Computed without a gradient, as the reference does.
    fn embed_slices(&self, yz: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let (sx, uy, uz) = yz.dims3()?;
        let ux = self.cfg.upsample * sx;
        let p = self.cfg.patch;
        // Only the source slices that the wanted rows interpolate from.
        let weights = linear_weights(sx, ux, false);
        let weights = &weights;
        let used: Vec<usize> =
            rows.clone().flat_map(|r| (0..sx).filter(move |&i| weights[r * sx + i] != 0.0)).collect();
        let first = used.iter().copied().min().unwrap_or(0);
        let last = used.iter().copied().max().unwrap_or(0);
        let mx = linear_matrix(sx, ux, false, yz.dtype(), yz.device())?.narrow(0, rows.start, rows.len())?.narrow(
            1,
            first,
            last + 1 - first,
        )?;
        let slices = apply_along(&yz.narrow(0, first, last + 1 - first)?, 0, &mx)?;
        let (n, ty, tz) = (rows.len(), uy / p, uz / p);
        let patches = slices.reshape((n, ty, p, tz, p))?.permute((0, 1, 3, 2, 4))?.reshape((n * ty * tz, p * p))?;
        let c = self.patch_weight.dim(0)?;
        let pe = patches.matmul(&self.patch_weight.detach().t()?)?.broadcast_add(&self.patch_bias.detach())?;
        pe.reshape((n, ty, tz, c))
    }

    /// SAM's `patch_embed` output for every up-sampled slice, `(upsample*X, Ty, Tz, C)` (for tests
    /// and inspection; the forward embeds in chunks).
    pub fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let yz = self.upsample_yz(x)?;
        self.embed_slices(&yz, 0..self.cfg.upsample * self.cfg.crop)
    }

    /// The input of block 0, `(1, H, W, D, C)`: slice-embedded patches plus the pooled position
    /// embedding (by H, W) and the depth embedding (by D).
    pub fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (c, p, t) = (self.cfg.embed_dim, self.cfg.patch, self.cfg.token_grid());
        let yz = self.upsample_yz(x)?;
        let chunk = (EMBED_CHUNK_ELEMENTS / (p * t * t * c)).clamp(1, t);
        let mut depth_tokens = Vec::new();
        for d0 in (0..t).step_by(chunk) {
            let n = chunk.min(t - d0);
            let pe = self.embed_slices(&yz, d0 * p..(d0 + n) * p)?.reshape((n, p, t, t, c))?;
            let w = self.slice_weight.reshape((1, p, 1, 1, c))?;
            depth_tokens.push(pe.broadcast_mul(&w)?.sum(1)?.broadcast_add(&self.slice_bias)?);
        }
        // (D, H, W, C) -> (1, H, W, D, C)
        let x = Tensor::cat(&depth_tokens, 0)?.permute((1, 2, 0, 3))?.unsqueeze(0)?;
        let g = self.cfg.position_grid();
        let k = g / t;
        let pos = self.pos_embed.reshape((t, k, t, k, c))?.mean(3)?.mean(1)?.reshape((1, t, t, 1, c))?;
        let depth = self.depth_embed.reshape((1, 1, 1, t, c))?;
        x.broadcast_add(&pos)?.broadcast_add(&depth)
    }

    /// The four tap features, channels-first `(1, out_chans, H, W, D)`, in block order.
    pub fn forward_taps(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = self.tokens(x)?;
        let mut taps = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            for (k, &after) in self.cfg.taps.iter().enumerate() {
                if after == i + 1 {
                    taps.push(self.necks[k].forward(&h)?);
                }
            }
        }
        Ok(taps)
    }
}
