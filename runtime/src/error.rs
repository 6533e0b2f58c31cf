//! The error type of the runtime crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] prosam_models::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A `.npy` file that is not a readable NumPy array of a supported kind.
    #[error("{}: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
