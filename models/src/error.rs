//! The error type of the models crate.

use std::path::PathBuf;

/// What can go wrong while building, loading or running a network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The configuration itself is impossible (MONAI would raise in its constructor).
    #[error("invalid SwinUNETR configuration: {0}")]
    InvalidConfig(String),

    /// An impossible teacher configuration (sizes that do not fit together).
    #[error("invalid AutoProSAM teacher configuration: {0}")]
    InvalidTeacherConfig(String),

    /// A precision conversion that is not possible.
    #[error("cannot convert: {0}")]
    Quantize(String),

    /// An input tensor that the network cannot take.
    #[error("invalid input of shape {shape:?}: {reason}")]
    InvalidInput { shape: Vec<usize>, reason: String },

    #[error("{}: missing tensor `{key}` (expected shape {expected:?})", path.display())]
    MissingTensor { path: PathBuf, key: String, expected: Vec<usize> },

    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{}: not a SwinUNETR checkpoint: {reason}", path.display())]
    NotSwinUnetr { path: PathBuf, reason: String },

    #[error("{}: not an AutoProSAM teacher checkpoint for this configuration: {reason}", path.display())]
    NotTeacher { path: PathBuf, reason: String },

    #[error("{}: cannot read PyTorch checkpoint: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{}: invalid prosam model file: {reason}", path.display())]
    ModelFile { path: PathBuf, reason: String },

    #[error(
        "{}: weights checksum mismatch (metadata says {expected}, weights hash to {found}); the file is corrupt or was modified",
        path.display()
    )]
    ChecksumMismatch { path: PathBuf, expected: String, found: String },
}

pub type Result<T> = std::result::Result<T, Error>;
