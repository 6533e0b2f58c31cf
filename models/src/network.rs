//! A network of either architecture, as a model file describes it and the runtime runs it: a
//! SwinUNETR student or the AutoProSAM teacher. Both map `(B, 1, D, H, W)` crops to logits
//! `(B, classes, D, H, W)`.

use candle_core::{Module, Result, Tensor};

use crate::autoprosam::AutoProSam;
use crate::swin_unetr::SwinUnetr;

#[derive(Debug, Clone)]
pub enum Network {
    SwinUnetr(SwinUnetr),
    AutoProSam(AutoProSam),
}

impl Network {
    /// `swin_unetr` or `autoprosam`, as the model file's metadata names it.
    pub fn architecture_name(&self) -> &'static str {
        match self {
            Network::SwinUnetr(_) => "swin_unetr",
            Network::AutoProSam(_) => "autoprosam",
        }
    }

    /// Whether the network takes an input of `shape`, and why not.
    pub fn check_input(&self, shape: &[usize]) -> crate::Result<()> {
        match self {
            Network::SwinUnetr(n) => n.config().check_input(shape),
            Network::AutoProSam(n) => n.config().check_input(shape),
        }
    }

    /// The forward pass, calling `mark(part)` as each part of the network finishes (see
    /// [`SwinUnetr::forward_marked`]; the teacher is one part, `forward`).
    pub fn forward_marked(&self, x: &Tensor, mark: &mut dyn FnMut(&'static str)) -> Result<Tensor> {
        match self {
            Network::SwinUnetr(n) => n.forward_marked(x, mark),
            Network::AutoProSam(n) => {
                let y = n.forward(x)?;
                mark("forward");
                Ok(y)
            }
        }
    }

    /// Logits for `x`, after checking its shape.
    pub fn forward_checked(&self, x: &Tensor) -> crate::Result<Tensor> {
        self.check_input(x.dims())?;
        Ok(self.forward(x)?)
    }
}

impl Module for Network {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Network::SwinUnetr(n) => n.forward(x),
            Network::AutoProSam(n) => n.forward(x),
        }
    }
}
