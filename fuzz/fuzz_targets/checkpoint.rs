//! The PyTorch zip checkpoint reader and MONAI's key mapping on arbitrary bytes, read from a file
//! as `prosam convert` reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prosam_models::format::import::{MonaiOptions, import_monai};

fuzz_target!(|data: &[u8]| {
    let path = prosam_fuzz::scratch().join("checkpoint.pt");
    std::fs::write(&path, data).unwrap();
    let _ = import_monai(&path, MonaiOptions::default());
});
