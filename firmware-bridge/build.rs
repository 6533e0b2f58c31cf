//! Gives libprosam.so a SONAME carrying the ABI version, so that a cart built against ABI 1 loads
//! `libprosam.so.1` and never an incompatible later ABI. ABI 1: `prosam_segment_params` gained
//! `postprocess` and `organs`.

/// Bumped whenever a function signature, struct layout or enum value of `prosam.h` changes
/// incompatibly. Kept equal to `PROSAM_ABI_VERSION` in the header.
const ABI_VERSION: u32 = 1;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libprosam.so.{ABI_VERSION}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
