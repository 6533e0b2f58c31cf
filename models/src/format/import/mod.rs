//! Importing weights from other frameworks' checkpoints.

pub mod monai;
pub mod pytorch;

pub use monai::{MonaiImport, MonaiOptions, from_state_dict, import_monai};
