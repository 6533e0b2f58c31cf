//! prosam's runtime: the inference engine behind the `prosam` device CLI.
//!
//! For now it holds the array I/O of the raw-network commands ([`npy`]) and process resource
//! figures ([`resources`]); the whole-volume pipeline grows here.

pub mod error;
pub mod npy;
pub mod resources;

pub use error::{Error, Result};
