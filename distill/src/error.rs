//! The training crate's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] prosam_models::Error),

    #[error(transparent)]
    Runtime(#[from] prosam_runtime::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A dataset description or one of its cases that cannot be trained on.
    #[error("{}: {reason}", path.display())]
    Dataset { path: PathBuf, reason: String },

    /// A checkpoint that does not belong to this run.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// Options that do not fit together.
    #[error("{0}")]
    Options(String),
}

pub type Result<T> = std::result::Result<T, Error>;
