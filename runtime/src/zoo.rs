//! The model built into the runtime, so that `prosam segment` and `prosam demo` work without a
//! model file: `models/zoo/prosam_ct_tiny.safetensors` (its card: `models/zoo/README.md`), a tiny
//! student trained on synthetic CTs built around the BTCV organ label maps. Like those maps it is
//! for research use only, and it is not for clinical decisions; its metadata says so too.

use prosam_models::format::ModelFile;

/// What messages call the built-in model.
pub const BUILT_IN_NAME: &str = "<built-in model prosam_ct_tiny>";

/// Printed on stderr whenever the built-in model segments.
pub const BUILT_IN_NOTICE: &str = "note: no model given (-m): using the built-in model prosam_ct_tiny, a tiny \
                                   student trained on synthetic CTs built around the BTCV label maps; research use \
                                   only, not for clinical decisions";

static BUILT_IN: &[u8] = include_bytes!("../../models/zoo/prosam_ct_tiny.safetensors");

/// The built-in student, checksum verified.
pub fn built_in_model() -> crate::Result<ModelFile> {
    Ok(ModelFile::from_static(BUILT_IN_NAME, BUILT_IN)?)
}
