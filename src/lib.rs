//! The root package of the prosam workspace: it carries the end-to-end tests (`tests/`) and the
//! latency benchmarks (`benches/`) that span crates. The crates themselves are re-exported here.

pub use prosam_models as models;
pub use prosam_runtime as runtime;
