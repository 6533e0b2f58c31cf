pub use prosam_models as models;
pub use prosam_runtime as runtime;
