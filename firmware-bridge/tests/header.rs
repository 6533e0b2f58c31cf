//! `include/prosam.h` is what cbindgen makes of `src/lib.rs` today: CI fails on a stale header.
//! Regenerate with `PROSAM_UPDATE_HEADER=1 cargo test --release -p prosam-firmware-bridge --test header`.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses src/lib.rs");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("UTF-8 header");
    let path = crate_dir.join("include/prosam.h");
    if std::env::var_os("PROSAM_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("write include/prosam.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/prosam.h is stale: regenerate it with PROSAM_UPDATE_HEADER=1 cargo test --release -p prosam-firmware-bridge --test header"
    );
}
