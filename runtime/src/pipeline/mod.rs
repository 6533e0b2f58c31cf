//! The whole-volume pipeline pieces, as MONAI computes them (`../shared/spec/pipeline.md`).

pub mod intensity;
pub mod postprocess;
pub mod sliding_window;

pub use sliding_window::{Blend, WindowPlan};
