//! Models built into the runtime, so that `prosam segment` and `prosam demo` work without a model
//! file. The demo student (`models/zoo/prosam_demo_tiny.safetensors`, its card in
//! `models/zoo/README.md`) was trained by `prosam-distill` on synthetic phantoms: it shows the
//! pipeline end to end and is for demonstration only, not for clinical use.

use prosam_models::format::ModelFile;

/// What messages call the built-in model.
pub const DEMO_NAME: &str = "<built-in demo model prosam_demo_tiny>";

/// Printed on stderr whenever the demo model segments.
pub const DEMO_NOTICE: &str = "note: no model given (-m): using the built-in demo model, a tiny student trained on \
                               synthetic phantoms; for demonstration only, not for clinical use";

static DEMO: &[u8] = include_bytes!("../../models/zoo/prosam_demo_tiny.safetensors");

/// The demo student, checksum verified.
pub fn demo_model() -> crate::Result<ModelFile> {
    Ok(ModelFile::from_static(DEMO_NAME, DEMO)?)
}
