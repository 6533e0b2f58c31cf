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

    /// A volume with NaN or infinite values, refused before they reach the network.
    #[error("{0}")]
    NonFinite(String),

    /// Pipeline options out of range.
    #[error("invalid options: {0}")]
    Options(String),

    /// A run that would need more memory than its budget.
    #[error("{what} needs about {}, over the memory budget of {}", crate::memory::format_bytes(*need), crate::memory::MemoryBudget::new(*budget))]
    Memory { what: String, need: u64, budget: u64 },

    /// An allocation that failed although the estimate fitted the budget (the limit shrank, or
    /// another part of the process took the memory): refused, not aborted.
    #[error("cannot allocate {} for {what}", crate::memory::format_bytes(*bytes))]
    Allocation { what: String, bytes: u64 },

    /// A label map JSON (`{"source": target}`) that cannot be read.
    #[error("{}: {reason}", path.display())]
    LabelMap { path: PathBuf, reason: String },

    /// A `.npy` file that is not a readable NumPy array of a supported kind.
    #[error("{}: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An error and its causes on one line, each cause said once: prosam's errors already include
/// their source's text (`out.nii.gz: Is a directory`), which the chain would repeat.
pub fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    }
    text
}
