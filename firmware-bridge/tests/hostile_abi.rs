//! Hostile calls into the C ABI, made from Rust through the same `extern "C"` functions a cart
//! links: each test stands for a class of call that once lost data or the host process (issue
//! "Hostile inputs") and fails on the code before its fix.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use prosam::*;

fn last_error() -> String {
    unsafe { CStr::from_ptr(prosam_last_error()) }.to_string_lossy().into_owned()
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
    let model = load(&common::coarse_model(&dir));
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
    let path = common::coarse_model(&dir);
    let dims = [200i64, 200, 120];
    let n = dims.iter().product::<i64>() as usize;
    let data = smooth(n);
    let v = volume(&data, prosam_voxel_type::Float32, dims);
    let segmenter = Segmenter::load(&path, SegmentOptions::default()).unwrap();
    let affine =
        prosam_runtime::volume::Affine::from_rows([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]);
    let shape = VolumeShape { dims: dims.map(|d| d as usize), affine, read_bytes: 4 * n as u64 };
    let need =
        |batch| segmenter.with_options(SegmentOptions { batch, ..SegmentOptions::default() }).memory_need(&shape);
    let (one, six) = (need(1), need(6));
    assert!(six > one + (64 << 20), "batch 6 should need clearly more: {one} vs {six}");
    let model = load(&path);
    let params =
        prosam_segment_params { batch: 6, max_memory_bytes: (one + six) / 2, ..prosam_segment_default_params() };
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
        let status =
            unsafe { prosam_model_load(c"/nonexistent/model.safetensors".as_ptr(), std::ptr::null(), &mut model) };
        done.send(status).unwrap();
    });
    let status = wait
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("prosam_model_load deadlocked in its log callback");
    assert_eq!(status, prosam_status::Io);
}

// ---- 14. Thread counts are bounded ----

#[test]
fn an_absurd_thread_count_is_refused() {
    let dir = common::scratch_dir("abi_threads");
    let path = CString::new(common::coarse_model(&dir).to_str().unwrap()).unwrap();
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let params = prosam_model_params { n_threads: i32::MAX, ..prosam_model_default_params() };
        let mut model = std::ptr::null_mut();
        let status = unsafe { prosam_model_load(path.as_ptr(), &params, &mut model) };
        done.send((status, last_error())).unwrap();
    });
    let (status, message) =
        wait.recv_timeout(std::time::Duration::from_secs(30)).expect("loading with n_threads INT32_MAX hung");
    assert_eq!(status, prosam_status::InvalidArgument, "{message}");
    assert!(message.contains("n_threads"), "{message}");
}

// ---- 15. Messages and callbacks as the header states them ----

#[test]
fn dimensions_too_large_are_called_too_large() {
    let data = [0f32; 8];
    let mut v = volume(&data, prosam_voxel_type::Float32, [2, 2, 2]);
    v.dims = [1 << 40, 2, 2];
    let checked = check_volume(&v).unwrap_err();
    assert!(checked.contains("too large") && !checked.contains("positive"), "{checked}");
}

static PROGRESS: std::sync::Mutex<Vec<(i32, i32)>> = std::sync::Mutex::new(Vec::new());

unsafe extern "C" fn record_progress(done: i32, total: i32, _user: *mut c_void) -> i32 {
    PROGRESS.lock().unwrap().push((done, total));
    0
}

#[test]
fn progress_is_reported_after_every_batch_and_only_then() {
    let dir = common::scratch_dir("abi_progress");
    let model = load(&common::coarse_model(&dir));
    let n = DIMS.iter().product::<i64>() as usize;
    let data = smooth(n);
    let params = prosam_segment_params { progress: Some(record_progress), batch: 2, ..prosam_segment_default_params() };
    assert_eq!(segment(model, &volume(&data, prosam_voxel_type::Float32, DIMS), &params), prosam_status::Ok);
    let calls = PROGRESS.lock().unwrap().clone();
    let total = calls[0].1;
    let expected: Vec<(i32, i32)> = (1..=(total + 1) / 2).map(|b| ((2 * b).min(total), total)).collect();
    assert_eq!(calls, expected, "one call after each batch of 2 windows");
    unsafe { prosam_model_free(model) };
}

/// The shared library the tests' build made (target/<profile>/libprosam.so).
fn shared_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent()?.parent()?.join("libprosam.so");
    lib.is_file().then_some(lib)
}

#[test]
fn the_library_exports_only_the_documented_functions() {
    let Some(lib) = shared_library() else {
        eprintln!("skipping: no libprosam.so beside the tests (run `cargo build --release --workspace` first)");
        return;
    };
    let out = std::process::Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output().expect("nm runs");
    let symbols = String::from_utf8_lossy(&out.stdout);
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/prosam.h")).unwrap();
    for name in symbols.lines().filter_map(|l| l.split_whitespace().last()).filter(|n| n.starts_with("prosam_")) {
        assert!(header.contains(&format!("{name}(")), "{name} is exported but not in prosam.h");
    }
}

const PANIC_CHILD: &str = "PROSAM_TEST_PANIC_CHILD";
static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

unsafe extern "C" fn collect_log(_level: prosam_log_level, message: *const c_char, _user: *mut c_void) {
    LOGGED.lock().unwrap().push(unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned());
}

#[test]
fn a_caught_panic_reaches_the_log_callback_not_the_hosts_stderr() {
    if std::env::var_os(PANIC_CHILD).is_some() {
        unsafe { prosam_set_log_callback(Some(collect_log), std::ptr::null_mut()) };
        assert_eq!(prosam::test_support::panic_inside_the_library(), prosam_status::Internal);
        assert!(last_error().contains("internal error"), "{}", last_error());
        let logged = LOGGED.lock().unwrap().join("\n");
        assert!(logged.contains("deliberate test panic"), "the log callback got: {logged}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["a_caught_panic_reaches_the_log_callback_not_the_hosts_stderr", "--exact", "--nocapture"])
        .env(PANIC_CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked at"), "the panic was printed on the host's stderr:\n{stderr}");
}

// ---- 6. The default memory budget is the process's effective limit ----

const RLIMIT_CHILD: &str = "PROSAM_TEST_RLIMIT_CHILD";

#[test]
fn under_an_address_space_limit_a_large_volume_is_refused_not_aborted() {
    if let Some(dir) = std::env::var_os(RLIMIT_CHILD) {
        let model = load(&common::coarse_model(Path::new(&dir)));
        // 512 x 512 x 1000 voxels over a few bytes: overlapping strides address a tiny buffer.
        let data = [0i16; 4096];
        let mut v = volume(&data, prosam_voxel_type::Int16, [512, 512, 1000]);
        v.strides = [1, 1, 1];
        v.affine[0] = 0.7;
        v.affine[5] = 0.7;
        v.affine[10] = 1.0;
        let mut labels = Vec::new();
        labels.try_reserve_exact(512 * 512 * 1000).unwrap();
        labels.resize(512 * 512 * 1000, 0u8);
        for budget in [0, u64::MAX] {
            let params = prosam_segment_params { max_memory_bytes: budget, ..prosam_segment_default_params() };
            let status = unsafe { prosam_segment(model, &v, &params, labels.as_mut_ptr(), labels.len()) };
            assert_eq!(status, prosam_status::OutOfMemory, "budget {budget}: {}", last_error());
            assert!(last_error().contains("memory budget"), "{}", last_error());
        }
        return;
    }
    let dir = common::scratch_dir("abi_rlimit");
    let script = "ulimit -v 2097152; exec \"$0\" under_an_address_space_limit_a_large_volume_is_refused_not_aborted --exact --nocapture";
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .arg(std::env::current_exe().unwrap())
        .env(RLIMIT_CHILD, &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the child under ulimit -v 2G failed or died ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
