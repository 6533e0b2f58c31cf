//! The error type of the models crate.

use std::path::PathBuf;

/// What can go wrong while building, loading or running a network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The configuration itself is impossible (MONAI would raise in its constructor).
    #[error("invalid SwinUNETR configuration: {0}")]
    InvalidConfig(String),

    /// An input tensor that the network cannot take.
    #[error("invalid input of shape {shape:?}: {reason}")]
    InvalidInput { shape: Vec<usize>, reason: String },

    #[error("missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },

    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: not a SwinUNETR checkpoint: {reason}")]
    NotSwinUnetr { path: PathBuf, reason: String },

    #[error("{path}: cannot read PyTorch checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{path}: invalid prosam model file: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    #[error(
        "{path}: weights checksum mismatch (metadata says {expected}, weights hash to {found}); the file is corrupt or was modified"
    )]
    ChecksumMismatch { path: PathBuf, expected: String, found: String },
}

pub type Result<T> = std::result::Result<T, Error>;
