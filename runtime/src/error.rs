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

    /// A NIfTI file that cannot be read as a CT volume.
    #[error("{}: {reason}", path.display())]
    Nifti { path: PathBuf, reason: String },

    /// A DICOM folder, file or series that cannot be read as a CT volume, or a DICOM output that
    /// cannot be made.
    #[error("{}: {reason}", path.display())]
    Dicom { path: PathBuf, reason: String },

    /// A compute device this build or this machine does not have.
    #[error("{0}")]
    Device(String),

    /// The caller's progress callback asked to stop.
    #[error("cancelled by the caller")]
    Cancelled,

    /// Pipeline options out of range.
    #[error("invalid options: {0}")]
    Options(String),

    /// A run that would need more memory than its budget.
    #[error("{what} needs about {}, over the memory budget of {}", crate::memory::format_bytes(*need), crate::memory::MemoryBudget::new(*budget))]
    Memory { what: String, need: u64, budget: u64 },

    /// A label map JSON (`{"source": target}`) that cannot be read.
    #[error("{}: {reason}", path.display())]
    LabelMap { path: PathBuf, reason: String },

    /// A `.npy` file that is not a readable NumPy array of a supported kind.
    #[error("{}: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
