//! The MLAM decoder (`VIT_MLAHead_h`, SETR-MLA style): a head per feature, each up-sampled x2,
//! concatenated with the half-resolution image, a classifier, and a final x2 up-sampling to the
//! crop. Keys `mlahead.head{2..5}.{0,3}.weight`, `cls.{0,3}.weight`; no biases.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::Config;
use super::apg::IN_EPS;
use crate::ops::{conv3d, instance_norm_act, interpolate_linear};

/// `Conv3d(3, no bias)` -> InstanceNorm -> ReLU.
fn conv_in_relu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    instance_norm_act(&conv3d(x, w, None, 1, 1)?, None, Some(0.0), IN_EPS)
}

/// Twice the trailing three axes, corners aligned.
fn double(x: &Tensor) -> Result<Tensor> {
    let size: Vec<usize> = x.dims()[2..].iter().map(|n| 2 * n).collect();
    interpolate_linear(x, &size, true)
}

#[derive(Debug, Clone)]
pub struct MlaDecoder {
    heads: Vec<(Tensor, Tensor)>,
    cls0: Tensor,
    cls3: Tensor,
}

impl MlaDecoder {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (o, h) = (cfg.out_chans, cfg.decoder_channels);
        let heads = (2..6)
            .map(|k| {
                let vb = vb.pp(format!("mlahead.head{k}"));
                Ok((vb.get((h, o, 3, 3, 3), "0.weight")?, vb.get((h, h, 3, 3, 3), "3.weight")?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            heads,
            cls0: vb.get((h, 4 * h + 1, 3, 3, 3), "cls.0.weight")?,
            cls3: vb.get((cfg.n_out, h, 3, 3, 3), "cls.3.weight")?,
        })
    }

    /// The `mlahead` output: each feature `(1, out_chans, T^3)` through its head, up-sampled to 2T,
    /// concatenated in order, `(1, 4 * decoder_channels, (2T)^3)`.
    pub fn heads(&self, features: &[Tensor]) -> Result<Tensor> {
        let outs = self
            .heads
            .iter()
            .zip(features)
            .map(|((w0, w3), f)| double(&conv_in_relu(&conv_in_relu(f, w0)?, w3)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)
    }

    /// The classifier on the heads and the image branch, before the final up-sampling:
    /// `(1, n_out, (2T)^3)` on axes (Y, Z, X). `input` is the crop `(1, 1, X, Y, Z)`.
    pub fn classify(&self, mla: &Tensor, input: &Tensor) -> Result<Tensor> {
        let size = mla.dims()[2..].to_vec();
        let img = interpolate_linear(&input.permute((0, 1, 3, 4, 2))?, &size, false)?;
        let y = conv_in_relu(&Tensor::cat(&[mla, &img], 1)?, &self.cls0)?;
        conv3d(&y, &self.cls3, None, 1, 1)
    }

    /// Logits `(1, n_out, X, Y, Z)` from the classifier output.
    pub fn finish(&self, cls: &Tensor) -> Result<Tensor> {
        double(cls)?.permute((0, 1, 4, 2, 3))?.contiguous()
    }

    /// Logits for the four decoder inputs and the crop.
    pub fn forward(&self, features: &[Tensor], input: &Tensor) -> Result<Tensor> {
        self.finish(&self.classify(&self.heads(features)?, input)?)
    }
}
