//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root: the nearest folder above this package whose Cargo.toml has `[workspace]`
/// (cargo runs each package's tests from the package's own folder).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .find(|d| std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]")))
        .unwrap_or(manifest_dir)
        .to_path_buf()
}

/// `../shared` beside the workspace root (or the folder `PROSAM_SHARED_DIR` names, for machines
/// where the fixtures travel with the working tree), when present.
pub fn shared_dir() -> Option<PathBuf> {
    let shared = match std::env::var_os("PROSAM_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("..").join("shared"),
    };
    shared.is_dir().then_some(shared)
}

/// A file under `../shared`, or `None` after printing why the test is skipped. With `CI=true` a
/// missing fixture fails the test instead: CI always has `../shared`.
pub fn shared_file(relative: &str) -> Option<PathBuf> {
    let found = shared_dir().map(|d| d.join(relative)).filter(|p| p.is_file());
    if found.is_none() {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!in_ci, "CI=true but the fixture ../shared/{relative} is missing");
        eprintln!("skipping: ../shared/{relative} not found (a clone without the shared fixtures)");
    }
    found
}

/// A folder under `../shared`, with [`shared_file`]'s rules when it is missing.
pub fn shared_folder(relative: &str) -> Option<PathBuf> {
    let dir = shared_dir().map(|d| d.join(relative)).filter(|d| d.is_dir());
    if dir.is_none() {
        shared_file(&format!("{relative}/"))?;
    }
    dir
}

/// A fresh empty folder under the target directory for one test's files.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Max absolute difference and argmax agreement over the class axis (axis 1) of two logit
/// tensors `(1, K, D, H, W)` given flat in C order.
pub fn compare_logits(a: &[f32], b: &[f32], classes: usize) -> (f32, f64) {
    assert_eq!(a.len(), b.len(), "logit tensors differ in size");
    let max_abs = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let voxels = a.len() / classes;
    let argmax =
        |t: &[f32], v: usize| (0..classes).max_by(|&i, &j| t[i * voxels + v].total_cmp(&t[j * voxels + v])).unwrap();
    let agree = (0..voxels).filter(|&v| argmax(a, v) == argmax(b, v)).count();
    (max_abs, agree as f64 / voxels as f64)
}

/// Writes a float32 NIfTI-1 volume (`data` x-fastest, `dims`) whose sform is `rows` (qform unset).
pub fn write_nifti_f32(path: &Path, dims: [usize; 3], data: &[f32], rows: [[f32; 4]; 3]) {
    let mut header = nifti::NiftiHeader {
        sform_code: 1,
        qform_code: 0,
        srow_x: rows[0],
        srow_y: rows[1],
        srow_z: rows[2],
        ..Default::default()
    };
    for a in 0..3 {
        header.pixdim[a + 1] = (0..3).map(|r| rows[r][a] * rows[r][a]).sum::<f32>().sqrt();
    }
    let array = ndarray::Array3::from_shape_vec(ndarray::ShapeBuilder::f(dims), data.to_vec()).unwrap();
    nifti::writer::WriterOptions::new(path).reference_header(&header).write_nifti(&array).unwrap();
}

/// Files in `dir` whose names mark them as prosam's temporary files.
pub fn temp_files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".prosam-")))
        .collect()
}

/// Random weights (normal, std `std`) for every parameter of a SwinUNETR configuration.
pub fn random_weights(cfg: &prosam_models::swin_unetr::Config, std: f32) -> Vec<(String, candle_core::Tensor)> {
    cfg.parameter_shapes()
        .into_iter()
        .map(|(k, shape)| (k, candle_core::Tensor::randn(0f32, std, shape, &candle_core::Device::Cpu).unwrap()))
        .collect()
}

/// A random-weight fs 12 student with the smallest window (64 x 32 x 32) and a coarse 4 mm grid:
/// a second or so per run on a CT of a few million voxels, most of it spent on the CT's own grid
/// (reading, restoring, cleaning, writing).
pub fn coarse_model(dir: &Path) -> PathBuf {
    let cfg = prosam_models::swin_unetr::Config::tiny();
    let tensors = random_weights(&cfg, 0.05);
    let metadata = prosam_models::format::Metadata {
        spacing: [4.0, 4.0, 4.0],
        roi_size: [64, 32, 32],
        ..prosam_models::format::Metadata::btcv("coarse", cfg)
    };
    let path = dir.join("coarse.safetensors");
    prosam_models::format::save(&path, metadata, &tensors).unwrap();
    path
}

/// A 192 x 192 x 96 float32 CT at 0.8 x 0.8 x 1 mm of smooth blobs, so that a label map on it is
/// not one class and compresses like a real one.
pub fn blob_ct(path: &Path) {
    let dims = [192, 192, 96];
    let mut data = Vec::with_capacity(dims.iter().product());
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let (x, y, z) = (i as f32 / 20.0, j as f32 / 17.0, k as f32 / 11.0);
                data.push(300.0 * (x.sin() * y.cos() + (z + x * 0.3).sin()) - 100.0);
            }
        }
    }
    write_nifti_f32(path, dims, &data, [[0.8, 0.0, 0.0, -100.0], [0.0, 0.8, 0.0, -100.0], [0.0, 0.0, 1.0, -60.0]]);
}
