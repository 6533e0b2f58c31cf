//! Gives libprosam.so a SONAME carrying the ABI version, so that a cart built against ABI 2 loads
//! `libprosam.so.2` and never an incompatible later ABI. ABI 1: `prosam_segment_params` gained
//! `postprocess` and `organs`; ABI 2: `max_memory_bytes` and PROSAM_STATUS_OUT_OF_MEMORY.

/// Bumped whenever a function signature, struct layout or enum value of `prosam.h` changes
/// incompatibly. Kept equal to `PROSAM_ABI_VERSION` in the header.
const ABI_VERSION: u32 = 2;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libprosam.so.{ABI_VERSION}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
