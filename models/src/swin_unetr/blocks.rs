//! MONAI's convolutional UNETR blocks (`monai/networks/blocks/{dynunet_block,unetr_block}.py`),
//! with instance norm (no affine) and LeakyReLU(0.01).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::quantized::Weight;
use crate::ops::{
    ConvArithmetic, PendingNorm, conv_transpose3d_cat, conv3d, conv3d_weight, conv3d_with_moments, instance_norm,
    instance_norm_act, instance_norm_act_with_moments,
};

const NORM_EPS: f64 = 1e-5;
const LEAKY_SLOPE: f64 = 0.01;

/// `UnetResBlock(in, out, kernel 3, stride 1)`: two 3x3x3 convolutions with instance norm and a
/// residual; the residual is a 1x1x1 convolution + instance norm when the channel count changes.
/// Keys: `conv1.conv.weight`, `conv2.conv.weight`, `conv3.conv.weight`.
#[derive(Debug, Clone)]
pub struct UnetResBlock {
    conv1: Weight,
    conv2: Weight,
    conv3: Option<Tensor>,
    arithmetic: ConvArithmetic,
}

impl UnetResBlock {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let conv1 = Weight::load(&vb, "conv1.conv.weight", &[out_channels, in_channels, 3, 3, 3])?;
        let conv2 = Weight::load(&vb, "conv2.conv.weight", &[out_channels, out_channels, 3, 3, 3])?;
        let conv3 = if in_channels != out_channels {
            Some(vb.get((out_channels, in_channels, 1, 1, 1), "conv3.conv.weight")?)
        } else {
            None
        };
        Ok(Self { conv1, conv2, conv3, arithmetic: ConvArithmetic::Float })
    }

    /// Sets the arithmetic of the 3x3x3 convolutions at inference on the CPU (see [`ConvArithmetic`]).
    pub fn set_arithmetic(&mut self, arithmetic: ConvArithmetic) {
        self.arithmetic = arithmetic;
    }

    /// The forward pass with the direct convolution kernel's fused instance norms (inference on
    /// AVX-512 CPUs): conv1 returns its output's moments, conv2 normalises and activates that
    /// output as it reads it, and the final norm uses conv2's moments and normalises the residual
    /// branch in the same pass, so the 96^3 activations are not read again for statistics nor
    /// written out once more normalised. `None` where the kernel does not serve these convolutions.
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((o1, m1)) = conv3d_with_moments(x, &self.conv1, [3; 3], 1, None, self.arithmetic)? else {
            return Ok(None);
        };
        let norm1 = PendingNorm { moments: &m1, eps: NORM_EPS, slope: LEAKY_SLOPE };
        let Some((o2, m2)) = conv3d_with_moments(&o1, &self.conv2, [3; 3], 1, Some(norm1), self.arithmetic)? else {
            return Ok(None);
        };
        let (residual, normalise) = match &self.conv3 {
            Some(w) => (conv3d(x, w, None, 0, 1)?, true),
            None => (x.clone(), false),
        };
        instance_norm_act_with_moments(&o2, m2, Some(&residual), normalise, Some(LEAKY_SLOPE), NORM_EPS).map(Some)
    }
}

impl Module for UnetResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x)? {
            return Ok(y);
        }
        let o = conv3d_weight(x, &self.conv1, [3; 3], None, 1)?;
        let o = instance_norm_act(&o, None, Some(LEAKY_SLOPE), NORM_EPS)?;
        let o = conv3d_weight(&o, &self.conv2, [3; 3], None, 1)?;
        let residual = match &self.conv3 {
            Some(w) => instance_norm(&conv3d(x, w, None, 0, 1)?, NORM_EPS)?,
            None => x.clone(),
        };
        instance_norm_act(&o, Some(&residual), Some(LEAKY_SLOPE), NORM_EPS)
    }
}

/// `UnetrBasicBlock(res_block=True)`: a [`UnetResBlock`] under the key `layer`.
#[derive(Debug, Clone)]
pub struct UnetrBasicBlock {
    layer: UnetResBlock,
}

impl UnetrBasicBlock {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { layer: UnetResBlock::new(in_channels, out_channels, vb.pp("layer"))? })
    }

    pub fn set_arithmetic(&mut self, arithmetic: ConvArithmetic) {
        self.layer.set_arithmetic(arithmetic);
    }
}

impl Module for UnetrBasicBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.layer.forward(x)
    }
}

/// `UnetrUpBlock(in, out, upsample_kernel_size=2, res_block=True)`: a 2x2x2 stride-2 transposed
/// convolution (no bias), concatenated with the skip (up-sampled first), then a [`UnetResBlock`].
#[derive(Debug, Clone)]
pub struct UnetrUpBlock {
    transp_conv: Tensor,
    conv_block: UnetResBlock,
}

impl UnetrUpBlock {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let transp_conv = vb.get((in_channels, out_channels, 2, 2, 2), "transp_conv.conv.weight")?;
        let conv_block = UnetResBlock::new(2 * out_channels, out_channels, vb.pp("conv_block"))?;
        Ok(Self { transp_conv, conv_block })
    }

    pub fn set_arithmetic(&mut self, arithmetic: ConvArithmetic) {
        self.conv_block.set_arithmetic(arithmetic);
    }

    pub fn forward(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        self.conv_block.forward(&conv_transpose3d_cat(x, &self.transp_conv, skip)?)
    }
}

/// `UnetOutBlock`: a 1x1x1 convolution with bias to the class logits (`conv.conv.{weight,bias}`).
#[derive(Debug, Clone)]
pub struct UnetOutBlock {
    weight: Tensor,
    bias: Tensor,
}

impl UnetOutBlock {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("conv.conv");
        Ok(Self {
            weight: vb.get((out_channels, in_channels, 1, 1, 1), "weight")?,
            bias: vb.get(out_channels, "bias")?,
        })
    }
}

impl Module for UnetOutBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv3d(x, &self.weight, Some(&self.bias), 0, 1)
    }
}
