//! The automatic prompt generator: CBIM's 3D U-Net (`UNet(block='SingleConv', norm='in')`) that
//! turns one encoder feature into a dense prompt volume of the same shape. Five levels of 1, 2, 4,
//! 8 and 10 times the base width; each of the four down levels scales by its own factor (2, or 1
//! where the grid is too small to halve again), as the reference class allows.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Config;
use crate::ops::{conv3d, instance_norm_act, interpolate_linear, max_pool3d};

/// InstanceNorm3d's epsilon (PyTorch's default).
pub const IN_EPS: f64 = 1e-5;

/// `SingleConv`: 3x3x3 convolution without bias, instance norm, ReLU (key `conv.conv.weight`).
#[derive(Debug, Clone)]
pub struct SingleConv {
    weight: Tensor,
}

impl SingleConv {
    pub fn new(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get((out_ch, in_ch, 3, 3, 3), "conv.conv.weight")? })
    }
}

impl Module for SingleConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        instance_norm_act(&conv3d(x, &self.weight, None, 1, 1)?, None, Some(0.0), IN_EPS)
    }
}

/// Two [`SingleConv`]s under `conv.{first}` and `conv.{first + 1}` (down levels put the pooling at 0).
#[derive(Debug, Clone)]
struct DoubleConv {
    first: SingleConv,
    second: SingleConv,
}

impl DoubleConv {
    fn new(in_ch: usize, out_ch: usize, first_index: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("conv");
        Ok(Self {
            first: SingleConv::new(in_ch, out_ch, vb.pp(first_index.to_string()))?,
            second: SingleConv::new(out_ch, out_ch, vb.pp((first_index + 1).to_string()))?,
        })
    }
}

impl Module for DoubleConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.second.forward(&self.first.forward(x)?)
    }
}

#[derive(Debug, Clone)]
pub struct Apg {
    inc_conv1: Tensor,
    inc_conv2: SingleConv,
    down: Vec<(usize, DoubleConv)>,
    up: Vec<DoubleConv>,
    outc_weight: Tensor,
    outc_bias: Tensor,
}

impl Apg {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.apg_channels();
        let o = cfg.out_chans;
        let down = (1..5)
            .map(|l| Ok((cfg.apg_scales[l - 1], DoubleConv::new(ch[l - 1], ch[l], 1, vb.pp(format!("down{l}")))?)))
            .collect::<Result<_>>()?;
        let up = (1..5)
            .map(|u| DoubleConv::new(ch[4 - u] + ch[5 - u], ch[4 - u], 0, vb.pp(format!("up{u}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            inc_conv1: vb.get((ch[0], o, 3, 3, 3), "inc.conv1.weight")?,
            inc_conv2: SingleConv::new(ch[0], ch[0], vb.pp("inc.conv2"))?,
            down,
            up,
            outc_weight: vb.get((o, ch[0], 1, 1, 1), "outc.weight")?,
            outc_bias: vb.get(o, "outc.bias")?,
        })
    }
}

impl Module for Apg {
    /// `(1, out_chans, T, T, T)` in and out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The first convolution has neither norm nor activation (CBIM's `inconv`).
        let mut h = self.inc_conv2.forward(&conv3d(x, &self.inc_conv1, None, 1, 1)?)?;
        let mut skips = Vec::with_capacity(4);
        for (scale, conv) in &self.down {
            skips.push(h.clone());
            h = conv.forward(&max_pool3d(&h, *scale)?)?;
        }
        for conv in &self.up {
            let skip = skips.pop().expect("one skip per level");
            let up = interpolate_linear(&h, &skip.dims()[2..], true)?;
            h = conv.forward(&Tensor::cat(&[&skip, &up], 1)?)?;
        }
        conv3d(&h, &self.outc_weight, Some(&self.outc_bias), 0, 1)
    }
}
