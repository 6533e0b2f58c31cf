//! A model file that changes while it is being loaded (a cart updating its models in place with
//! `cp`) must not kill the process: the load completes from what was read, or fails with an
//! error (issue "Hostile inputs", class 5). Deterministic: the file is truncated at a fixed point
//! after it was opened, in a child process, so that a SIGBUS shows as that child's death.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use prosam_models::format::{Metadata, ModelFile};
use prosam_models::swin_unetr::Config;

const CHILD: &str = "PROSAM_TEST_TRUNCATED_MODEL";

fn write_model(path: &Path) {
    let cfg = Config::tiny();
    let tensors: Vec<(String, Tensor)> = cfg
        .parameter_shapes()
        .into_iter()
        .map(|(k, shape)| (k, Tensor::randn(0f32, 0.05, shape, &Device::Cpu).unwrap()))
        .collect();
    prosam_models::format::save(path, Metadata::btcv("replaced", cfg), &tensors).unwrap();
}

/// In the child: open the file, cut it to 4 KiB as an overwrite in progress would, then build
/// the network from the opened file.
fn child(path: &Path) {
    let file = ModelFile::open(path).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(4096).unwrap();
    let net = file.swin_unetr(DType::F32, &Device::Cpu);
    assert!(net.is_ok(), "the opened file no longer builds: {:?}", net.err());
    // Opening the cut file now is an error that names it, not a crash.
    let err = ModelFile::open(path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_model_file_cut_after_it_was_opened_still_loads_or_fails_cleanly() {
    if let Some(path) = std::env::var_os(CHILD) {
        child(Path::new(&path));
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("model_file_replaced");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    write_model(&path);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["a_model_file_cut_after_it_was_opened_still_loads_or_fails_cleanly", "--exact", "--nocapture"])
        .env(CHILD, &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the child died or failed ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
