//! Importing weights from other frameworks' checkpoints.

pub mod autoprosam;
pub mod monai;
pub mod pytorch;
pub mod sam;

pub use autoprosam::{TeacherImport, import_autoprosam};
pub use monai::{MonaiImport, MonaiOptions, from_state_dict, import_monai};
