//! prosam's networks in Candle.
//!
//! - [`ops`]: the 3D operations Candle 0.11 lacks (convolutions, norms, shifted windows, window attention),
//!   written from differentiable Candle primitives so that training builds on them.
//! - [`swin_unetr`]: MONAI's SwinUNETR, the student network, numerically equal to MONAI 1.6.1.
//! - [`autoprosam`]: the AutoProSAM teacher (3D-adapted SAM encoder, prompt generator, MLAM decoder).
//! - [`network`]: either network, as the runtime runs it.
//! - [`format`]: the prosam model file (safetensors + JSON metadata + checksum) and checkpoint import.

pub mod autoprosam;
pub mod error;
pub mod format;
pub mod network;
pub mod ops;
pub mod swin_unetr;
pub mod temp_file;

pub use error::{Error, Result};
