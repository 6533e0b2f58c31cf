//! The Swin transformer encoder of SwinUNETR (`swinViT.*`): patch embedding, four stages of
//! (shifted) window attention blocks, patch merging, and the normalised skip features.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::UnetrBasicBlock;
use super::config::{Config, Downsample};
use crate::ops::quantized::Linear;
use crate::ops::window::{compute_shift_regions, padded_dims, relative_position_index, stage_window};
use crate::ops::window_gather::{add_reversed_shifted, partition_shifted};
use crate::ops::{channel_layer_norm, conv3d, gelu_erf, window_attention_qkv};

const LN_EPS: f64 = 1e-5;

/// Applies a linear layer to the last axis of a tensor of any rank.
fn linear_tokens(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let c = *dims.last().expect("tokens have a channel axis");
    let y = layer.forward(&x.reshape(((), c))?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty") = y.dim(1)?;
    y.reshape(out)
}

/// `nn.LayerNorm(C)` with affine parameters over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")? })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        channel_layer_norm(x, Some((&self.weight, &self.bias)), LN_EPS)
    }
}

/// Multi-head self-attention inside windows, with Swin's learned relative-position bias.
#[derive(Debug, Clone)]
pub struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    relative_position_bias_table: Tensor,
    heads: usize,
    window_size: usize,
}

impl WindowAttention {
    pub fn new(dim: usize, heads: usize, window_size: usize, vb: VarBuilder) -> Result<Self> {
        let table_rows = (2 * window_size - 1).pow(3);
        Ok(Self {
            qkv: Linear::new(dim, 3 * dim, true, vb.pp("qkv"))?,
            proj: Linear::new(dim, dim, true, vb.pp("proj"))?,
            relative_position_bias_table: vb.get((table_rows, heads), "relative_position_bias_table")?,
            heads,
            window_size,
        })
    }

    /// The `(heads, n, n)` bias for windows of `n` tokens (MONAI's `index[:n, :n]`, also for
    /// clamped windows). Gathered on every call so that a trained table is never stale.
    fn bias(&self, n: usize) -> Result<Tensor> {
        let index = relative_position_index(self.window_size, n);
        let index = Tensor::from_vec(index, n * n, self.relative_position_bias_table.device())?;
        self.relative_position_bias_table
            .index_select(&index, 0)?
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }

    /// `x (B * nW, n, C)`; for shifted windows, `regions (nW, n)` (see
    /// [`compute_shift_regions`]).
    pub fn forward(&self, x: &Tensor, regions: Option<&Tensor>) -> Result<Tensor> {
        let (_, n, c) = x.dims3()?;
        let scale = ((c / self.heads) as f64).powf(-0.5);
        let qkv = linear_tokens(&self.qkv, x)?;
        let o = window_attention_qkv(&qkv, self.heads, scale, &self.bias(n)?, regions)?;
        linear_tokens(&self.proj, &o)
    }
}

/// `Linear(C, 4C) -> GELU (erf) -> Linear(4C, C)`, keys `linear1`, `linear2`.
#[derive(Debug, Clone)]
pub struct Mlp {
    linear1: Linear,
    linear2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear1: Linear::new(dim, hidden, true, vb.pp("linear1"))?,
            linear2: Linear::new(hidden, dim, true, vb.pp("linear2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_tokens(&self.linear2, &gelu_erf(&linear_tokens(&self.linear1, x)?)?)
    }
}

/// Window geometry shared by the blocks of a stage.
#[derive(Debug, Clone)]
struct StageGeometry {
    window: [usize; 3],
    shift: [usize; 3],
    padded: [usize; 3],
    /// The shift regions, when the stage's shifted blocks shift at all.
    regions: Option<Tensor>,
}

/// One Swin block: (shifted) window attention and an MLP, each with a pre-norm and a residual.
#[derive(Debug, Clone)]
pub struct SwinTransformerBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    shifted: bool,
}

impl SwinTransformerBlock {
    pub fn new(dim: usize, heads: usize, window_size: usize, shifted: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: WindowAttention::new(dim, heads, window_size, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, 4 * dim, vb.pp("mlp"))?,
            shifted,
        })
    }

    /// `x (B, D, H, W, C)` channels-last.
    fn forward(&self, x: &Tensor, g: &StageGeometry) -> Result<Tensor> {
        // Zero padding comes after the norm: padded tokens are exact zeros, attended like any other.
        let y = self.norm1.forward(x)?;
        let regions = if self.shifted && g.shift != [0; 3] { g.regions.as_ref() } else { None };
        let shift = if regions.is_some() { g.shift } else { [0; 3] };
        let windows = partition_shifted(&y, g.window, g.padded, shift)?;
        let attended = self.attn.forward(&windows, regions)?;
        let x = add_reversed_shifted(x, &attended, g.window, g.padded, shift)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// Patch merging: the 8 strided sub-volumes concatenated along channels (order per
/// [`Downsample`]), layer norm, then `Linear(8C, 2C)` without bias.
#[derive(Debug, Clone)]
pub struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
    /// Index of each concatenated sub-volume in the flattened (a, b, c) offsets.
    order: Tensor,
}

impl PatchMerging {
    pub fn new(dim: usize, downsample: Downsample, vb: VarBuilder) -> Result<Self> {
        let order: Vec<u32> = downsample.offsets().iter().map(|[a, b, c]| (a * 4 + b * 2 + c) as u32).collect();
        Ok(Self {
            norm: LayerNorm::new(8 * dim, vb.pp("norm"))?,
            reduction: Linear::new(8 * dim, 2 * dim, false, vb.pp("reduction"))?,
            order: Tensor::from_vec(order, 8, vb.device())?,
        })
    }
}

impl Module for PatchMerging {
    /// `(B, D, H, W, C)` to `(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)`; odd sizes are zero-padded.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for axis in 1..4 {
            if x.dim(axis)? % 2 == 1 {
                x = x.pad_with_zeros(axis, 0, 1)?;
            }
        }
        let (b, d, h, w, c) = x.dims5()?;
        let (d2, h2, w2) = (d / 2, h / 2, w / 2);
        let parts = x
            .reshape(vec![b, d2, 2, h2, 2, w2, 2, c])?
            .permute(vec![0, 1, 3, 5, 2, 4, 6, 7])?
            .reshape((b * d2 * h2 * w2, 8, c))?
            .index_select(&self.order, 1)?
            .reshape((b, d2, h2, w2, 8 * c))?;
        linear_tokens(&self.reduction, &self.norm.forward(&parts)?)
    }
}

/// One Swin stage (`layersN.0`): its blocks, then patch merging. Channels-first in and out.
#[derive(Debug, Clone)]
pub struct BasicLayer {
    blocks: Vec<SwinTransformerBlock>,
    downsample: PatchMerging,
    window_size: usize,
}

impl BasicLayer {
    pub fn new(cfg: &Config, stage: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.stage_channels(stage);
        let blocks = (0..cfg.depths[stage])
            .map(|b| {
                SwinTransformerBlock::new(
                    dim,
                    cfg.num_heads[stage],
                    cfg.window_size,
                    b % 2 == 1,
                    vb.pp(format!("blocks.{b}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            downsample: PatchMerging::new(dim, cfg.downsample, vb.pp("downsample"))?,
            window_size: cfg.window_size,
        })
    }
}

impl Module for BasicLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let dims = [d, h, w];
        let (window, shift) = stage_window(dims, self.window_size, self.window_size / 2);
        let padded = padded_dims(dims, window);
        let shifts = self.blocks.len() > 1 && shift.iter().any(|&s| s > 0);
        let regions = if shifts { Some(compute_shift_regions(padded, window, shift, x.device())?) } else { None };
        let geometry = StageGeometry { window, shift, padded, regions };
        let mut y = x.permute((0, 2, 3, 4, 1))?.contiguous()?;
        for block in &self.blocks {
            y = block.forward(&y, &geometry)?;
        }
        self.downsample.forward(&y)?.permute((0, 4, 1, 2, 3))?.contiguous()
    }
}

/// The encoder (`swinViT`): returns the five skip features hs0..hs4, layer-normalised over
/// channels (without affine) when `normalize` is set.
#[derive(Debug, Clone)]
pub struct SwinTransformer {
    patch_embed_weight: Tensor,
    patch_embed_bias: Tensor,
    layers: Vec<BasicLayer>,
    /// `use_v2`: residual convolution blocks before each stage (`layersNc.0`).
    layers_c: Option<Vec<UnetrBasicBlock>>,
    normalize: bool,
}

impl SwinTransformer {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let f = cfg.feature_size;
        let pe = vb.pp("patch_embed.proj");
        let layers =
            (0..4).map(|s| BasicLayer::new(cfg, s, vb.pp(format!("layers{}.0", s + 1)))).collect::<Result<Vec<_>>>()?;
        let layers_c = if cfg.use_v2 {
            let blocks = (0..4)
                .map(|s| {
                    let c = cfg.stage_channels(s);
                    UnetrBasicBlock::new(c, c, vb.pp(format!("layers{}c.0", s + 1)))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(blocks)
        } else {
            None
        };
        Ok(Self {
            patch_embed_weight: pe.get((f, cfg.in_channels, 2, 2, 2), "weight")?,
            patch_embed_bias: pe.get(f, "bias")?,
            layers,
            layers_c,
            normalize: cfg.normalize,
        })
    }

    /// Sets the arithmetic of the `use_v2` blocks' convolutions (see [`crate::ops::ConvArithmetic`]).
    pub fn set_conv_arithmetic(&mut self, arithmetic: crate::ops::ConvArithmetic) {
        for block in self.layers_c.iter_mut().flatten() {
            block.set_arithmetic(arithmetic);
        }
    }

    /// `proj_out`: channels-last layer norm without affine on a channels-first volume.
    fn proj_out(&self, x: &Tensor) -> Result<Tensor> {
        if !self.normalize {
            return Ok(x.clone());
        }
        let y = channel_layer_norm(&x.permute((0, 2, 3, 4, 1))?, None, LN_EPS)?;
        y.permute((0, 4, 1, 2, 3))?.contiguous()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_marked(x, &mut |_| {})
    }

    /// [`Self::forward`], calling `mark` after the patch embedding and after each stage.
    pub fn forward_marked(&self, x: &Tensor, mark: &mut dyn FnMut(&'static str)) -> Result<Vec<Tensor>> {
        const STAGES: [&str; 4] = ["swin_stage1", "swin_stage2", "swin_stage3", "swin_stage4"];
        let mut x = conv3d(x, &self.patch_embed_weight, Some(&self.patch_embed_bias), 0, 2)?;
        let mut skips = vec![self.proj_out(&x)?];
        mark("patch_embed");
        for (s, layer) in self.layers.iter().enumerate() {
            if let Some(blocks) = &self.layers_c {
                x = blocks[s].forward(&x)?;
            }
            x = layer.forward(&x)?;
            skips.push(self.proj_out(&x)?);
            mark(STAGES[s]);
        }
        Ok(skips)
    }
}
