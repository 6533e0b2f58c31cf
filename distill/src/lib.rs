//! prosam's training: the AutoProSAM teacher (`train-teacher`) and, built on it, the distillation
//! of SwinUNETR students. It builds on the runtime's volumes, preprocessing and sliding window.
//!
//! - [`data`]: datasets in the Medical Segmentation Decathlon layout, label maps, the cache of
//!   preprocessed volumes;
//! - [`augment`]: random crops with a positive:negative ratio, flips and rotations;
//! - [`loss`], [`optim`]: Dice + cross-entropy; AdamW per group with its state, clipping and the
//!   learning-rate schedule;
//! - [`teacher`]: the teacher's two training stages, checkpoints and validation;
//! - [`student`]: distillation of SwinUNETR students from a frozen teacher.

pub mod augment;
pub mod data;
pub mod error;
pub mod loss;
pub mod optim;
pub use prosam_runtime::rng;
pub mod run;
pub mod student;
pub mod teacher;

pub use error::{Error, Result};
