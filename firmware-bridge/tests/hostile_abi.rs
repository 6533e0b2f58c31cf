//! Hostile calls into the C ABI, made from Rust through the same `extern "C"` functions a cart
//! links: each test stands for a class of call that once lost data or the host process (issue
//! "Hostile inputs") and fails on the code before its fix.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use prosam::*;
use prosam_models::format::Metadata;
use prosam_models::swin_unetr::Config;

fn last_error() -> String {
    unsafe { CStr::from_ptr(prosam_last_error()) }.to_string_lossy().into_owned()
}

/// A random-weight fs 12 student on a coarse grid with the smallest window: a fraction of a
/// second per small volume.
fn coarse_model(dir: &Path) -> PathBuf {
    let cfg = Config::tiny();
    let tensors = common::random_weights(&cfg, 0.05);
    let metadata = Metadata { spacing: [4.0, 4.0, 4.0], roi_size: [64, 32, 32], ..Metadata::btcv("coarse", cfg) };
    let path = dir.join("coarse.safetensors");
    prosam_models::format::save(&path, metadata, &tensors).unwrap();
    path
}

fn load(path: &Path) -> *mut prosam_model {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let mut model = std::ptr::null_mut();
    let params = prosam_model_params { n_threads: 2, ..prosam_model_default_params() };
    let status = unsafe { prosam_model_load(c.as_ptr(), &params, &mut model) };
    assert_eq!(status, prosam_status::Ok, "{}", last_error());
    model
}

/// A descriptor of `data` (x fastest, `dims`) at 2 mm, RAS.
fn volume<T>(data: &[T], voxel_type: prosam_voxel_type, dims: [i64; 3]) -> prosam_volume {
    let mut affine = [0.0; 16];
    for a in 0..3 {
        affine[5 * a] = 2.0;
    }
    affine[15] = 1.0;
    prosam_volume {
        data: data.as_ptr() as *const c_void,
        voxel_type: voxel_type as i32,
        dims,
        strides: [1, dims[0], dims[0] * dims[1]],
        rescale_slope: 1.0,
        rescale_intercept: 0.0,
        affine,
        affine_convention: prosam_affine_convention::Ras as i32,
    }
}

fn segment(model: *const prosam_model, v: &prosam_volume, params: &prosam_segment_params) -> prosam_status {
    let n: i64 = v.dims.iter().product();
    let mut labels = vec![0u8; n.max(0) as usize];
    unsafe { prosam_segment(model, v, params, labels.as_mut_ptr(), labels.len()) }
}

const DIMS: [i64; 3] = [40, 36, 20];

fn smooth(n: usize) -> Vec<f32> {
    (0..n).map(|v| 200.0 * ((v as f32) * 0.013).sin() - 50.0).collect()
}

// ---- 1. Non-finite numbers ----

#[test]
fn a_volume_with_non_finite_values_is_refused_naming_the_count_and_the_first() {
    let dir = common::scratch_dir("abi_nan");
    let model = load(&coarse_model(&dir));
    let n = DIMS.iter().product::<i64>() as usize;
    let mut data = smooth(n);
    data[7 + 40 * (2 + 36 * 3)] = f32::NAN;
    data[n - 1] = f32::NEG_INFINITY;
    data[n - 2] = f32::INFINITY;
    let params = prosam_segment_default_params();
    let status = segment(model, &volume(&data, prosam_voxel_type::Float32, DIMS), &params);
    assert_eq!(status, prosam_status::InvalidArgument, "{}", last_error());
    let message = last_error();
    assert!(message.contains("3 non-finite") && message.contains("(7, 2, 3)"), "{message}");

    // Finite voxels whose rescale overflows float32.
    let raw: Vec<i16> = (0..n).map(|v| (v % 1000) as i16).collect();
    let mut v = volume(&raw, prosam_voxel_type::Int16, DIMS);
    v.rescale_slope = 1e300;
    let status = segment(model, &v, &params);
    assert_eq!(status, prosam_status::InvalidArgument, "{}", last_error());
    assert!(last_error().contains("non-finite"), "{}", last_error());

    // The same volume with finite values segments.
    let status = segment(model, &volume(&smooth(n), prosam_voxel_type::Float32, DIMS), &params);
    assert_eq!(status, prosam_status::Ok, "{}", last_error());
    unsafe { prosam_model_free(model) };
}

// ---- 7. The memory budget counts the call's own options ----

#[test]
fn the_memory_budget_counts_the_calls_batch() {
    use prosam_runtime::engine::{SegmentOptions, Segmenter};
    use prosam_runtime::memory::VolumeShape;
    let dir = common::scratch_dir("abi_batch_budget");
    let path = coarse_model(&dir);
    let dims = [200i64, 200, 120];
    let n = dims.iter().product::<i64>() as usize;
    let data = smooth(n);
    let v = volume(&data, prosam_voxel_type::Float32, dims);
    let segmenter = Segmenter::load(&path, SegmentOptions::default()).unwrap();
    let affine = prosam_runtime::volume::Affine::from_rows([
        [2.0, 0.0, 0.0, 0.0],
        [0.0, 2.0, 0.0, 0.0],
        [0.0, 0.0, 2.0, 0.0],
    ]);
    let shape = VolumeShape { dims: dims.map(|d| d as usize), affine, read_bytes: 4 * n as u64 };
    let need = |batch| segmenter.with_options(SegmentOptions { batch, ..SegmentOptions::default() }).memory_need(&shape);
    let (one, six) = (need(1), need(6));
    assert!(six > one + (64 << 20), "batch 6 should need clearly more: {one} vs {six}");
    let model = load(&path);
    let params = prosam_segment_params { batch: 6, max_memory_bytes: (one + six) / 2, ..prosam_segment_default_params() };
    let status = segment(model, &v, &params);
    assert_eq!(status, prosam_status::OutOfMemory, "batch 6 ran under a budget it needs more than: {}", last_error());
    let params = prosam_segment_params { batch: 1, ..params };
    assert_eq!(segment(model, &v, &params), prosam_status::Ok, "{}", last_error());
    unsafe { prosam_model_free(model) };
}

// ---- 11. The log callback may call back into the library ----

unsafe extern "C" fn replaces_itself(_level: prosam_log_level, _message: *const c_char, _user: *mut c_void) {
    unsafe { prosam_set_log_callback(None, std::ptr::null_mut()) };
}

#[test]
fn a_log_callback_that_replaces_itself_does_not_deadlock() {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        unsafe { prosam_set_log_callback(Some(replaces_itself), std::ptr::null_mut()) };
        let mut model = std::ptr::null_mut();
        // A failed load logs its error through the callback.
        let status = unsafe { prosam_model_load(c"/nonexistent/model.safetensors".as_ptr(), std::ptr::null(), &mut model) };
        done.send(status).unwrap();
    });
    let status = wait.recv_timeout(std::time::Duration::from_secs(30)).expect("prosam_model_load deadlocked in its log callback");
    assert_eq!(status, prosam_status::Io);
}

// ---- 14. Thread counts are bounded ----

#[test]
fn an_absurd_thread_count_is_refused() {
    let dir = common::scratch_dir("abi_threads");
    let path = CString::new(coarse_model(&dir).to_str().unwrap()).unwrap();
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let params = prosam_model_params { n_threads: i32::MAX, ..prosam_model_default_params() };
        let mut model = std::ptr::null_mut();
        let status = unsafe { prosam_model_load(path.as_ptr(), &params, &mut model) };
        done.send((status, last_error())).unwrap();
    });
    let (status, message) = wait.recv_timeout(std::time::Duration::from_secs(30)).expect("loading with n_threads INT32_MAX hung");
    assert_eq!(status, prosam_status::InvalidArgument, "{message}");
    assert!(message.contains("n_threads"), "{message}");
}
