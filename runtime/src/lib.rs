//! prosam's runtime: the inference engine behind the `prosam` device CLI.
//!
//! - [`volume`]: CT volumes, NIfTI I/O, orientation and resampling;
//! - [`pipeline`]: intensity transform and sliding-window inference;
//! - [`device`]: the CPU, CUDA and Metal, as this build has them;
//! - [`engine`]: [`engine::Segmenter`], the whole pipeline behind `prosam segment`;
//! - [`memory`]: the memory budget, checked from headers before voxels are read;
//! - [`npy`] for the raw-network commands and [`resources`] for memory figures.

pub mod device;
pub mod engine;
pub mod error;
pub mod label_map;
pub mod memory;
pub mod metrics;
pub mod npy;
pub mod phantom;
pub mod pipeline;
pub mod resources;
pub mod rng;
pub mod volume;
pub mod zoo;

pub use error::{Error, Result};
