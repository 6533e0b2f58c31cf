//! Gives libprosam.so a SONAME carrying the ABI version, so that a cart built against ABI 0 loads
//! `libprosam.so.0` and never an incompatible later ABI.

/// Bumped whenever a function signature, struct layout or enum value of `prosam.h` changes
/// incompatibly. Kept equal to `PROSAM_ABI_VERSION` in the header.
const ABI_VERSION: u32 = 0;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libprosam.so.{ABI_VERSION}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
