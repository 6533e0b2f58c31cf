//! AutoProSAM (Li et al., WACV 2025), the teacher: SAM's ViT image encoder lifted to 3D with
//! adapters and a depth axis, an automatic prompt generator (APG) and the MLAM decoder, as the
//! released reference code computes it. See `../shared/spec/teacher.md`.

pub mod apg;
pub mod block;
pub mod config;
pub mod decoder;
pub mod encoder;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use apg::Apg;
pub use block::{Attention3d, Block3d};
pub use config::{ApgInput, Config};
pub use decoder::MlaDecoder;
pub use encoder::ImageEncoder3d;

/// The teacher. Keys mirror the reference checkpoints: `encoder.*` (the image encoder's
/// state_dict), `feature.*` (the APG's) and `decoder.*` (the decoder's).
#[derive(Debug, Clone)]
pub struct AutoProSam {
    config: Config,
    encoder: ImageEncoder3d,
    feature: Apg,
    decoder: MlaDecoder,
}

impl AutoProSam {
    pub fn new(cfg: &Config, vb: VarBuilder) -> crate::Result<Self> {
        cfg.validate()?;
        Ok(Self {
            config: cfg.clone(),
            encoder: ImageEncoder3d::new(cfg, vb.pp("encoder"))?,
            feature: Apg::new(cfg, vb.pp("feature"))?,
            decoder: MlaDecoder::new(cfg, vb.pp("decoder"))?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn encoder(&self) -> &ImageEncoder3d {
        &self.encoder
    }

    pub fn apg(&self) -> &Apg {
        &self.feature
    }

    pub fn decoder(&self) -> &MlaDecoder {
        &self.decoder
    }

    /// The decoder's four feature inputs from the taps (in block order), with the APG's prompt in
    /// the place `placement` says.
    pub fn decoder_inputs(&self, taps: &[Tensor], placement: ApgInput) -> Result<Vec<Tensor>> {
        let [f1, f2, f3, f4] = taps else {
            candle_core::bail!("the decoder needs 4 taps, got {}", taps.len());
        };
        Ok(match placement {
            ApgInput::Stage4 => vec![f1.clone(), f2.clone(), f3.clone(), self.feature.forward(f4)?],
            ApgInput::Stage1 => vec![f4.clone(), f3.clone(), f2.clone(), self.feature.forward(f1)?],
        })
    }

    /// Logits `(B, n_out, X, Y, Z)` of crops, after checking their shape.
    pub fn forward_checked(&self, x: &Tensor) -> crate::Result<Tensor> {
        self.config.check_input(x.dims())?;
        Ok(self.forward(x)?)
    }

    fn forward_one(&self, x: &Tensor) -> Result<Tensor> {
        let taps = self.encoder.forward_taps(x)?;
        let features = self.decoder_inputs(&taps, self.config.apg_input)?;
        self.decoder.forward(&features, x)
    }
}

impl Module for AutoProSam {
    /// Logits `(B, n_out, X, Y, Z)` for crops `(B, 1, X, Y, Z)` in the teacher's intensity space;
    /// the encoder works on one crop at a time, so a batch runs crop by crop.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        if b == 1 {
            return self.forward_one(x);
        }
        let outs = (0..b).map(|i| self.forward_one(&x.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }
}
