//! SwinUNETR (Hatamizadeh et al. 2022) exactly as MONAI 1.6.1 computes it: a Swin transformer
//! encoder, convolutional skip encoders and a UNETR decoder. See `../shared/spec/swinunetr.md`.

pub mod blocks;
pub mod config;
pub mod swin;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::ConvArithmetic;

pub use blocks::{UnetOutBlock, UnetResBlock, UnetrBasicBlock, UnetrUpBlock};
pub use config::{Config, Downsample};
pub use swin::SwinTransformer;

/// The network. Keys mirror MONAI's state_dict (`swinViT.*`, `encoder1`..`encoder10`,
/// `decoder1`..`decoder5`, `out`).
#[derive(Debug, Clone)]
pub struct SwinUnetr {
    config: Config,
    swin_vit: SwinTransformer,
    encoder1: UnetrBasicBlock,
    encoder2: UnetrBasicBlock,
    encoder3: UnetrBasicBlock,
    encoder4: UnetrBasicBlock,
    encoder10: UnetrBasicBlock,
    decoder5: UnetrUpBlock,
    decoder4: UnetrUpBlock,
    decoder3: UnetrUpBlock,
    decoder2: UnetrUpBlock,
    decoder1: UnetrUpBlock,
    out: UnetOutBlock,
}

impl SwinUnetr {
    pub fn new(cfg: &Config, vb: VarBuilder) -> crate::Result<Self> {
        cfg.validate()?;
        let f = cfg.feature_size;
        Ok(Self {
            config: cfg.clone(),
            swin_vit: SwinTransformer::new(cfg, vb.pp("swinViT"))?,
            encoder1: UnetrBasicBlock::new(cfg.in_channels, f, vb.pp("encoder1"))?,
            encoder2: UnetrBasicBlock::new(f, f, vb.pp("encoder2"))?,
            encoder3: UnetrBasicBlock::new(2 * f, 2 * f, vb.pp("encoder3"))?,
            encoder4: UnetrBasicBlock::new(4 * f, 4 * f, vb.pp("encoder4"))?,
            encoder10: UnetrBasicBlock::new(16 * f, 16 * f, vb.pp("encoder10"))?,
            decoder5: UnetrUpBlock::new(16 * f, 8 * f, vb.pp("decoder5"))?,
            decoder4: UnetrUpBlock::new(8 * f, 4 * f, vb.pp("decoder4"))?,
            decoder3: UnetrUpBlock::new(4 * f, 2 * f, vb.pp("decoder3"))?,
            decoder2: UnetrUpBlock::new(2 * f, f, vb.pp("decoder2"))?,
            decoder1: UnetrUpBlock::new(f, f, vb.pp("decoder1"))?,
            out: UnetOutBlock::new(f, cfg.out_channels, vb.pp("out"))?,
        })
    }

    /// Sets the arithmetic of the conv blocks' 3x3x3 convolutions at inference on the CPU: int8
    /// models run [`ConvArithmetic::Int16`] (see [`crate::format::ModelFile::network`]).
    pub fn set_conv_arithmetic(&mut self, arithmetic: ConvArithmetic) {
        self.swin_vit.set_conv_arithmetic(arithmetic);
        for block in
            [&mut self.encoder1, &mut self.encoder2, &mut self.encoder3, &mut self.encoder4, &mut self.encoder10]
        {
            block.set_arithmetic(arithmetic);
        }
        for block in
            [&mut self.decoder5, &mut self.decoder4, &mut self.decoder3, &mut self.decoder2, &mut self.decoder1]
        {
            block.set_arithmetic(arithmetic);
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Logits `(B, out_channels, D, H, W)` for `x (B, in_channels, D, H, W)`, after checking the
    /// shape (see [`Config::check_input`]).
    pub fn forward_checked(&self, x: &Tensor) -> crate::Result<Tensor> {
        self.config.check_input(x.dims())?;
        Ok(self.forward(x)?)
    }
}

impl SwinUnetr {
    /// The forward pass, calling `mark(part)` as each part finishes: the Swin encoder's patch
    /// embedding and four stages, then `encoders` (the convolutional skip encoders) and each
    /// decoder. `prosam bench --profile` times the parts with it.
    pub fn forward_marked(&self, x: &Tensor, mark: &mut dyn FnMut(&'static str)) -> Result<Tensor> {
        let hs = self.swin_vit.forward_marked(x, mark)?;
        let enc0 = self.encoder1.forward(x)?;
        let enc1 = self.encoder2.forward(&hs[0])?;
        let enc2 = self.encoder3.forward(&hs[1])?;
        let enc3 = self.encoder4.forward(&hs[2])?;
        let dec4 = self.encoder10.forward(&hs[4])?;
        mark("encoders");
        let dec3 = self.decoder5.forward(&dec4, &hs[3])?;
        mark("decoder5");
        let dec2 = self.decoder4.forward(&dec3, &enc3)?;
        mark("decoder4");
        let dec1 = self.decoder3.forward(&dec2, &enc2)?;
        mark("decoder3");
        let dec0 = self.decoder2.forward(&dec1, &enc1)?;
        mark("decoder2");
        let out = self.decoder1.forward(&dec0, &enc0)?;
        mark("decoder1");
        let logits = self.out.forward(&out)?;
        mark("out");
        Ok(logits)
    }
}

impl Module for SwinUnetr {
    /// The unchecked forward pass; prefer [`SwinUnetr::forward_checked`] for outside input.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_marked(x, &mut |_| {})
    }
}
