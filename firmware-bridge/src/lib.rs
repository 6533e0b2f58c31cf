//! prosam's C ABI (`include/prosam.h`, generated from this file by cbindgen).
//!
//! Thin on purpose: every function checks its arguments, converts them, calls
//! [`prosam_runtime::engine::Segmenter`], and maps the outcome to a status code, with the message
//! kept per thread for `prosam_last_error`. No panic crosses the boundary: each entry point runs
//! under `catch_unwind`.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::RwLock;

use prosam_runtime::device::DeviceChoice;
use prosam_runtime::engine::{SegmentOptions, Segmenter};
use prosam_runtime::memory::{MemoryBudget, VolumeShape};
use prosam_runtime::pipeline::Blend;
use prosam_runtime::pipeline::postprocess::LabelOptions;
use prosam_runtime::volume::{Affine, Volume};

/// Result of every fallible call. On anything but PROSAM_STATUS_OK, prosam_last_error() says why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_status {
    Ok = 0,
    /// A NULL pointer, a size or value out of range, an inconsistent descriptor.
    InvalidArgument = 1,
    /// A file could not be read or written.
    Io = 2,
    /// The model file is not a valid prosam model (corrupt, wrong checksum, unknown format).
    Model = 3,
    /// The caller's output buffer is smaller than the volume.
    BufferTooSmall = 4,
    /// A valid request this build cannot serve (a device or precision it was built without).
    Unsupported = 5,
    /// The progress callback asked to stop.
    Cancelled = 6,
    /// A bug in prosam (a caught panic); the process can continue.
    Internal = 7,
    /// The call would need more memory than `prosam_segment_params.max_memory_bytes` (or the
    /// machine has); refused before allocating.
    OutOfMemory = 8,
}

/// Voxel types of `prosam_volume.voxel_type`, little-endian host values.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_voxel_type {
    Int16 = 0,
    Int32 = 1,
    Uint8 = 2,
    Uint16 = 3,
    Float32 = 4,
}

/// World convention of `prosam_volume.affine`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_affine_convention {
    /// NIfTI's RAS+ world: x grows towards the patient's right, y anterior, z superior.
    Ras = 0,
    /// DICOM's LPS+ patient coordinates (x left, y posterior, z superior), as built from
    /// ImagePositionPatient and ImageOrientationPatient.
    Lps = 1,
}

/// Compute devices of `prosam_model_params.device`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_device {
    Cpu = 0,
    Cuda = 1,
    Metal = 2,
}

/// Precisions of `prosam_model_params.precision`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_precision {
    /// The precision the model file was stored in (f16 files compute in f32 on the CPU).
    Model = 0,
    /// Compute in f32: f32 and f16 files. An int8 file cannot be widened back (it is refused).
    F32 = 1,
}

/// How overlapping windows are weighted (`prosam_segment_params.blend`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_blend {
    Gaussian = 0,
    Constant = 1,
}

/// Which organs get their largest connected component kept and their enclosed holes filled
/// (`prosam_segment_params.postprocess`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_postprocess {
    /// The label map as the network gives it.
    None = 0,
    /// The solid organs: spleen, kidneys, gallbladder, liver, stomach, pancreas, adrenal glands
    /// (vessels and the oesophagus may be cut into real pieces by the scan, so they are left as
    /// they are).
    Solid = 1,
    /// Every organ.
    All = 2,
}

/// Log levels passed to the log callback.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum prosam_log_level {
    Error = 0,
    Warn = 1,
    Info = 2,
}

/// Called after every batch of windows with the windows done (1 to total) and their total. Return
/// 0 to go on, anything else to cancel (prosam_segment then returns PROSAM_STATUS_CANCELLED).
/// Called from one of the model's compute threads, never concurrently within one prosam_segment
/// call, and never after that call has returned.
pub type prosam_progress_fn = Option<unsafe extern "C" fn(done: i32, total: i32, user_data: *mut c_void) -> i32>;

/// Receives the library's log lines, among them the message of a panic the library caught (which
/// is not printed on stderr). `message` is valid only during the call. May be called from any
/// thread that calls into the library, concurrently. It may call prosam_set_log_callback itself;
/// the change applies from the next line on.
pub type prosam_log_fn =
    Option<unsafe extern "C" fn(level: prosam_log_level, message: *const c_char, user_data: *mut c_void)>;

/// How to load a model. Get one from prosam_model_default_params() and change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct prosam_model_params {
    /// Compute threads for this model's calls, at most PROSAM_MAX_THREADS (1024); 0 = the machine's
    /// physical cores.
    pub n_threads: i32,
    /// One of prosam_device (the first GPU of its kind). CUDA and Metal need a library built with
    /// the `cuda` or `metal` feature; without it, or without the GPU, loading returns
    /// PROSAM_STATUS_UNSUPPORTED with a message naming what is missing.
    pub device: i32,
    /// One of prosam_precision, overriding the file's.
    pub precision: i32,
}

/// A CT volume in the caller's memory.
///
/// Voxel (i, j, k), for 0 <= i < dims[0] etc., is the element at
/// `data + i * strides[0] + j * strides[1] + k * strides[2]` (strides in elements, not bytes, and
/// may be negative); every such element must be readable. Its value in HU is
/// `raw * rescale_slope + rescale_intercept` (DICOM's Rescale Slope and Intercept; 1 and 0 for data
/// already in HU).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct prosam_volume {
    /// Borrowed for the duration of the call only.
    pub data: *const c_void,
    /// One of prosam_voxel_type.
    pub voxel_type: i32,
    pub dims: [i64; 3],
    pub strides: [i64; 3],
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// Row-major 4x4 voxel-to-world matrix in millimetres, mapping (i, j, k, 1) to world
    /// coordinates; the last row must be 0 0 0 1.
    pub affine: [f64; 16],
    /// One of prosam_affine_convention: the world frame of `affine`.
    pub affine_convention: i32,
}

/// How to segment. Get one from prosam_segment_default_params() and change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct prosam_segment_params {
    /// Fraction of a window shared with its neighbour, in [0, 1). Default 0.5.
    pub overlap: f64,
    /// One of prosam_blend. Default gaussian.
    pub blend: i32,
    /// Windows per forward pass, at least 1. Default 1.
    pub batch: i32,
    /// Optional; NULL for none.
    pub progress: prosam_progress_fn,
    /// Passed to `progress` untouched.
    pub progress_user_data: *mut c_void,
    /// One of prosam_postprocess. Default solid.
    pub postprocess: i32,
    /// Optional: a NUL-terminated, comma-separated list of organ names (as
    /// prosam_model_label_name gives them) to keep; every other organ becomes background. NULL
    /// keeps all. Borrowed for the duration of the call only.
    pub organs: *const c_char,
    /// The most memory the call may use, in bytes, checked from the volume's size and this call's
    /// options (the batch included) before anything is allocated (PROSAM_STATUS_OUT_OF_MEMORY
    /// beyond it). 0: the process's effective limit, the smallest of physical memory, the cgroup's
    /// memory.max and RLIMIT_AS less what the process already maps, with a 10% margin. A larger
    /// value is capped at that limit. Default 0.
    ///
    /// Allocations inside the network's forward pass (Candle's tensors) cannot fail gracefully:
    /// the estimate is what keeps them within the limit, and a host that shrinks the limit during
    /// a call (setrlimit from another thread) can still see an allocation failure abort.
    pub max_memory_bytes: u64,
}

/// A loaded model: opaque. Create with prosam_model_load, release with prosam_model_free.
pub struct prosam_model {
    segmenter: Segmenter,
    pool: rayon::ThreadPool,
    label_names: Vec<CString>,
    metadata_json: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

struct LogSink {
    callback: unsafe extern "C" fn(prosam_log_level, *const c_char, *mut c_void),
    user_data: usize,
}

static LOG: RwLock<Option<LogSink>> = RwLock::new(None);

fn set_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

fn log(level: prosam_log_level, message: &str) {
    // Copied out, so that no lock is held while the callback runs: it may set a new callback.
    let sink = LOG.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| (s.callback, s.user_data));
    if let Some((callback, user_data)) = sink {
        let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the caller registered this function pointer and user data for this purpose.
        unsafe { callback(level, text.as_ptr(), user_data as *mut c_void) };
    }
}

thread_local! {
    /// Set while this thread runs an entry point: its panics are the library's to report.
    static IN_ENTRY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that keeps the library's panics (on a thread inside an entry
/// point, or on one of its compute threads) off the host's stderr: [`entry`] reports them through
/// the log callback and the status. Other panics go to the hook that was there before.
fn quiet_library_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = IN_ENTRY.with(|e| e.get())
                || std::thread::current().name().is_some_and(|n| n.starts_with(THREAD_PREFIX));
            if !ours {
                previous(info);
            }
        }));
    });
}

/// The names of a model's compute threads start with this.
const THREAD_PREFIX: &str = "prosam-";

/// A failed call: its status and message.
struct Failure(prosam_status, String);

fn invalid(message: impl Into<String>) -> Failure {
    Failure(prosam_status::InvalidArgument, message.into())
}

fn from_runtime(e: prosam_runtime::Error) -> Failure {
    use prosam_models::Error as M;
    use prosam_runtime::Error as R;
    let status = match &e {
        R::Io { .. } | R::Model(M::Io { .. }) => prosam_status::Io,
        R::Model(_) => prosam_status::Model,
        R::Cancelled => prosam_status::Cancelled,
        R::Options(_) | R::NonFinite(_) | R::Nifti { .. } | R::Npy { .. } | R::Dicom { .. } | R::LabelMap { .. } => {
            prosam_status::InvalidArgument
        }
        R::Device(_) => prosam_status::Unsupported,
        R::Candle(_) => prosam_status::Internal,
        R::Memory { .. } | R::Allocation { .. } => prosam_status::OutOfMemory,
    };
    Failure(status, e.to_string())
}

/// Runs an entry point: clears the thread's error, maps failures and panics to status codes.
fn entry(f: impl FnOnce() -> Result<(), Failure>) -> prosam_status {
    set_error("");
    quiet_library_panics();
    let outer = IN_ENTRY.with(|e| e.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(f));
    IN_ENTRY.with(|e| e.set(outer));
    match outcome {
        Ok(Ok(())) => prosam_status::Ok,
        Ok(Err(Failure(status, message))) => {
            log(prosam_log_level::Error, &message);
            set_error(&message);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let message = format!("internal error (a bug in prosam, please report it): {what}");
            log(prosam_log_level::Error, &message);
            set_error(&message);
            prosam_status::Internal
        }
    }
}

/// The library's version, "MAJOR.MINOR.PATCH". A static string: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn prosam_version() -> *const c_char {
    c"0.1.0".as_ptr()
}

/// The message of the last failed call on this thread ("" after a successful one). Owned by
/// the library; valid until the next prosam call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn prosam_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A short name of a status code ("PROSAM_STATUS_OK", ...), or "unknown status". Static.
#[unsafe(no_mangle)]
pub extern "C" fn prosam_status_name(status: i32) -> *const c_char {
    let name: &CStr = match status {
        0 => c"PROSAM_STATUS_OK",
        1 => c"PROSAM_STATUS_INVALID_ARGUMENT",
        2 => c"PROSAM_STATUS_IO",
        3 => c"PROSAM_STATUS_MODEL",
        4 => c"PROSAM_STATUS_BUFFER_TOO_SMALL",
        5 => c"PROSAM_STATUS_UNSUPPORTED",
        6 => c"PROSAM_STATUS_CANCELLED",
        7 => c"PROSAM_STATUS_INTERNAL",
        8 => c"PROSAM_STATUS_OUT_OF_MEMORY",
        _ => c"unknown status",
    };
    name.as_ptr()
}

/// Sets (or, with NULL, removes) the process-wide log callback. `user_data` is passed to it
/// untouched and must stay valid until the callback is replaced.
///
/// # Safety
/// `callback`, when not NULL, must be a function safe to call from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_set_log_callback(callback: prosam_log_fn, user_data: *mut c_void) {
    let sink = callback.map(|callback| LogSink { callback, user_data: user_data as usize });
    *LOG.write().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// Defaults: all physical cores, CPU, the file's precision.
#[unsafe(no_mangle)]
pub extern "C" fn prosam_model_default_params() -> prosam_model_params {
    prosam_model_params { n_threads: 0, device: prosam_device::Cpu as i32, precision: prosam_precision::Model as i32 }
}

/// Defaults: overlap 0.5, gaussian blending, one window per pass, no progress callback, the solid
/// organs post-processed, every organ kept, the machine's memory as the budget.
#[unsafe(no_mangle)]
pub extern "C" fn prosam_segment_default_params() -> prosam_segment_params {
    prosam_segment_params {
        overlap: 0.5,
        blend: prosam_blend::Gaussian as i32,
        batch: 1,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        postprocess: prosam_postprocess::Solid as i32,
        organs: std::ptr::null(),
        max_memory_bytes: 0,
    }
}

/// Loads a model file (its checksum verified). On success `*out_model` receives a model the
/// caller owns and must release with prosam_model_free; on failure it is set to NULL.
///
/// # Safety
/// `path` must be a NUL-terminated string; `params` NULL (defaults) or a valid struct;
/// `out_model` a valid pointer to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_model_load(
    path: *const c_char,
    params: *const prosam_model_params,
    out_model: *mut *mut prosam_model,
) -> prosam_status {
    entry(|| {
        if out_model.is_null() {
            return Err(invalid("prosam_model_load: out_model is NULL"));
        }
        // SAFETY: checked non-NULL; the caller provides a writable pointer.
        unsafe { *out_model = std::ptr::null_mut() };
        if path.is_null() {
            return Err(invalid("prosam_model_load: path is NULL"));
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let path =
            unsafe { CStr::from_ptr(path) }.to_str().map_err(|_| invalid("prosam_model_load: path is not UTF-8"))?;
        // SAFETY: NULL or a valid struct, per the contract.
        let params = if params.is_null() { prosam_model_default_params() } else { unsafe { *params } };
        if params.n_threads < 0 || params.n_threads as usize > prosam_runtime::resources::MAX_THREADS {
            return Err(invalid(format!(
                "prosam_model_load: n_threads {} is outside 0..={}",
                params.n_threads,
                prosam_runtime::resources::MAX_THREADS
            )));
        }
        let device = match params.device {
            0 => DeviceChoice::Cpu,
            1 => DeviceChoice::Cuda(0),
            2 => DeviceChoice::Metal(0),
            d => return Err(invalid(format!("prosam_model_load: unknown device {d}"))),
        };
        let dtype = match params.precision {
            0 => None,
            1 => Some(prosam_runtime::device::DType::F32),
            p => return Err(invalid(format!("prosam_model_load: unknown precision {p}"))),
        };
        let segmenter = Segmenter::load_on(Path::new(path), SegmentOptions::default(), device, dtype).map_err(|e| {
            match from_runtime(e) {
                Failure(status, message) => Failure(status, format!("prosam_model_load: {message}")),
            }
        })?;
        if params.precision == prosam_precision::F32 as i32
            && segmenter.metadata().precision == prosam_models::format::Precision::Int8
        {
            return Err(Failure(
                prosam_status::Unsupported,
                format!("prosam_model_load: {path} is int8; load its f32 or f16 file to compute in f32"),
            ));
        }
        let threads = if params.n_threads == 0 { 0 } else { params.n_threads as usize };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("{THREAD_PREFIX}{i}"))
            .build()
            .map_err(|e| Failure(prosam_status::Internal, format!("cannot start compute threads: {e}")))?;
        let meta = segmenter.metadata();
        let label_names = meta.labels.iter().map(|l| CString::new(l.replace('\0', " ")).unwrap_or_default()).collect();
        let json = serde_json::to_string(meta).map_err(|e| Failure(prosam_status::Internal, e.to_string()))?;
        let metadata_json = CString::new(json).unwrap_or_default();
        log(prosam_log_level::Info, &format!("loaded {} ({})", path, meta.name));
        let model = Box::new(prosam_model { segmenter, pool, label_names, metadata_json });
        // SAFETY: checked non-NULL above.
        unsafe { *out_model = Box::into_raw(model) };
        Ok(())
    })
}

/// Releases a model and every string it handed out. NULL is ignored. Must not race with other
/// calls on the same model.
///
/// # Safety
/// `model` must be NULL or a pointer from prosam_model_load not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_model_free(model: *mut prosam_model) {
    if !model.is_null() {
        // SAFETY: per the contract, a live pointer from Box::into_raw.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// # Safety
/// `model` must be NULL or a live model.
unsafe fn model_ref<'a>(model: *const prosam_model, function: &str) -> Result<&'a prosam_model, Failure> {
    // SAFETY: NULL or a live model, per the caller's contract.
    unsafe { model.as_ref() }.ok_or_else(|| invalid(format!("{function}: model is NULL")))
}

/// The number of labels the model outputs, background (label 0) included.
///
/// # Safety
/// `model` must be NULL or a live model; `out_count` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_model_label_count(model: *const prosam_model, out_count: *mut i32) -> prosam_status {
    entry(|| {
        // SAFETY: forwarded contract.
        let model = unsafe { model_ref(model, "prosam_model_label_count") }?;
        if out_count.is_null() {
            return Err(invalid("prosam_model_label_count: out_count is NULL"));
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_count = model.label_names.len() as i32 };
        Ok(())
    })
}

/// The name of label `index` (e.g. "liver"). The string is owned by the model and valid until
/// prosam_model_free.
///
/// # Safety
/// `model` must be NULL or a live model; `out_name` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_model_label_name(
    model: *const prosam_model,
    index: i32,
    out_name: *mut *const c_char,
) -> prosam_status {
    entry(|| {
        // SAFETY: forwarded contract.
        let model = unsafe { model_ref(model, "prosam_model_label_name") }?;
        if out_name.is_null() {
            return Err(invalid("prosam_model_label_name: out_name is NULL"));
        }
        let name = usize::try_from(index).ok().and_then(|i| model.label_names.get(i)).ok_or_else(|| {
            invalid(format!("prosam_model_label_name: index {index} is outside 0..{}", model.label_names.len()))
        })?;
        // SAFETY: checked non-NULL.
        unsafe { *out_name = name.as_ptr() };
        Ok(())
    })
}

/// The model's metadata (architecture, labels, spacing, intensity transform, ROI, precision,
/// checksum) as a JSON object. Owned by the model; valid until prosam_model_free.
///
/// # Safety
/// `model` must be NULL or a live model; `out_json` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_model_metadata_json(
    model: *const prosam_model,
    out_json: *mut *const c_char,
) -> prosam_status {
    entry(|| {
        // SAFETY: forwarded contract.
        let model = unsafe { model_ref(model, "prosam_model_metadata_json") }?;
        if out_json.is_null() {
            return Err(invalid("prosam_model_metadata_json: out_json is NULL"));
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_json = model.metadata_json.as_ptr() };
        Ok(())
    })
}

/// A caller's volume descriptor, checked: every offset [`gather`] computes fits in `isize`, and
/// the values map to HU. Made without touching the voxels.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct CheckedVolume {
    pub dims: [usize; 3],
    strides: [i64; 3],
    voxel_type: prosam_voxel_type,
    slope: f64,
    intercept: f64,
    pub affine: Affine,
    /// The lowest and highest element offsets the descriptor addresses.
    pub span: (i64, i64),
}

impl CheckedVolume {
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn element_size(&self) -> usize {
        self.voxel_type.size()
    }
}

impl prosam_voxel_type {
    fn size(self) -> usize {
        match self {
            prosam_voxel_type::Uint8 => 1,
            prosam_voxel_type::Int16 | prosam_voxel_type::Uint16 => 2,
            prosam_voxel_type::Int32 | prosam_voxel_type::Float32 => 4,
        }
    }
}

/// Checks a volume descriptor (everything but the readability of its data, which only the
/// caller can vouch for). Public for the fuzz target.
#[doc(hidden)]
pub fn check_volume(v: &prosam_volume) -> Result<CheckedVolume, String> {
    if v.data.is_null() {
        return Err("prosam_segment: volume->data is NULL".into());
    }
    let voxel_type = match v.voxel_type {
        0 => prosam_voxel_type::Int16,
        1 => prosam_voxel_type::Int32,
        2 => prosam_voxel_type::Uint8,
        3 => prosam_voxel_type::Uint16,
        4 => prosam_voxel_type::Float32,
        t => return Err(format!("prosam_segment: unknown voxel type {t}")),
    };
    let mut dims = [0usize; 3];
    for a in 0..3 {
        if v.dims[a] <= 0 {
            return Err(format!("prosam_segment: volume->dims[{a}] = {} must be positive", v.dims[a]));
        }
        if v.dims[a] > i32::MAX as i64 {
            return Err(format!(
                "prosam_segment: volume->dims[{a}] = {} is too large (at most {})",
                v.dims[a],
                i32::MAX
            ));
        }
        if v.strides[a] == 0 {
            return Err(format!("prosam_segment: volume->strides[{a}] is 0"));
        }
        dims[a] = v.dims[a] as usize;
    }
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= isize::MAX as usize / 8);
    if count.is_none() {
        return Err(format!("prosam_segment: volume->dims {:?} are too large", v.dims));
    }
    // The addressed range, in i128 so that no product wraps; then in bytes within isize.
    let (mut low, mut high) = (0i128, 0i128);
    for a in 0..3 {
        let extent = (v.dims[a] as i128 - 1) * v.strides[a] as i128;
        if extent < 0 { low += extent } else { high += extent }
    }
    let size = voxel_type.size() as i128;
    if low * size < isize::MIN as i128 || (high + 1) * size > isize::MAX as i128 {
        return Err(format!("prosam_segment: volume->strides {:?} address beyond any buffer", v.strides));
    }
    if !(v.rescale_slope.is_finite() && v.rescale_slope != 0.0 && v.rescale_intercept.is_finite()) {
        return Err(format!(
            "prosam_segment: rescale slope {} and intercept {} must be finite, the slope non-zero",
            v.rescale_slope, v.rescale_intercept
        ));
    }
    if v.affine.iter().any(|x| !x.is_finite()) {
        return Err("prosam_segment: volume->affine has a NaN or infinite entry".into());
    }
    if v.affine[12..] != [0.0, 0.0, 0.0, 1.0] {
        return Err(format!("prosam_segment: the affine's last row is {:?}, not 0 0 0 1", &v.affine[12..]));
    }
    let rows = [0, 1, 2].map(|r| [v.affine[4 * r], v.affine[4 * r + 1], v.affine[4 * r + 2], v.affine[4 * r + 3]]);
    let affine = match v.affine_convention {
        0 => Affine::from_rows(rows),
        1 => Affine::from_rows(rows).lps_to_ras(),
        c => return Err(format!("prosam_segment: unknown affine convention {c}")),
    };
    if affine.inverse().is_none() {
        return Err("prosam_segment: the affine is singular".into());
    }
    Ok(CheckedVolume {
        dims,
        strides: v.strides,
        voxel_type,
        slope: v.rescale_slope,
        intercept: v.rescale_intercept,
        affine,
        span: (low as i64, high as i64),
    })
}

/// Copies the caller's voxels into HU, stored first axis fastest; `None` when the copy cannot be
/// allocated.
///
/// # Safety
/// `data` must be readable at every element offset in `checked.span`.
#[doc(hidden)]
pub unsafe fn gather(data: *const c_void, checked: &CheckedVolume) -> Option<Volume> {
    let CheckedVolume { dims, strides, slope, intercept, .. } = *checked;
    let mut out = Vec::new();
    out.try_reserve_exact(checked.voxels()).ok()?;
    macro_rules! gather {
        ($t:ty) => {{
            let base = data as *const $t;
            for k in 0..dims[2] as i64 {
                for j in 0..dims[1] as i64 {
                    let row = k * strides[2] + j * strides[1];
                    for i in 0..dims[0] as i64 {
                        // SAFETY: the offset lies in the checked span, which the caller guarantees
                        // readable.
                        let raw = unsafe { base.offset((row + i * strides[0]) as isize).read_unaligned() };
                        out.push((raw as f64 * slope + intercept) as f32);
                    }
                }
            }
        }};
    }
    match checked.voxel_type {
        prosam_voxel_type::Int16 => gather!(i16),
        prosam_voxel_type::Int32 => gather!(i32),
        prosam_voxel_type::Uint8 => gather!(u8),
        prosam_voxel_type::Uint16 => gather!(u16),
        prosam_voxel_type::Float32 => gather!(f32),
    }
    Some(Volume { dims, data: out, affine: checked.affine })
}

/// Segments a volume into `labels`: one uint8 label per voxel, dense, first dimension fastest
/// (`labels[i + dims[0] * (j + dims[1] * k)]`, as NIfTI stores voxels), on the volume's own grid.
/// `labels_len` must be at least dims[0] * dims[1] * dims[2]. The caller owns `labels`; on failure
/// its content is unspecified.
///
/// Several threads may segment with the same model at once; each call computes on the model's
/// thread pool.
///
/// # Safety
/// `model` must be NULL or a live model; `volume` NULL or a valid descriptor whose data is
/// readable as it describes; `params` NULL (defaults) or valid; `labels` NULL or writable for
/// `labels_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prosam_segment(
    model: *const prosam_model,
    volume: *const prosam_volume,
    params: *const prosam_segment_params,
    labels: *mut u8,
    labels_len: usize,
) -> prosam_status {
    entry(|| {
        // SAFETY: forwarded contract.
        let model = unsafe { model_ref(model, "prosam_segment") }?;
        // SAFETY: NULL or valid, per the contract.
        let volume = unsafe { volume.as_ref() }.ok_or_else(|| invalid("prosam_segment: volume is NULL"))?;
        // SAFETY: NULL or valid, per the contract.
        let params = if params.is_null() { prosam_segment_default_params() } else { unsafe { *params } };
        if labels.is_null() {
            return Err(invalid("prosam_segment: labels is NULL"));
        }
        let blend = match params.blend {
            0 => Blend::Gaussian,
            1 => Blend::Constant,
            b => return Err(invalid(format!("prosam_segment: unknown blend {b}"))),
        };
        if params.batch < 1 {
            return Err(invalid(format!("prosam_segment: batch {} must be at least 1", params.batch)));
        }
        let options = SegmentOptions { overlap: params.overlap, blend, batch: params.batch as usize };
        options.validate().map_err(|e| invalid(format!("prosam_segment: {e}")))?;
        let names = &model.segmenter.metadata().labels;
        let clean = match params.postprocess {
            0 => "none",
            1 => "solid",
            2 => "all",
            p => return Err(invalid(format!("prosam_segment: unknown postprocess {p}"))),
        };
        let organs = if params.organs.is_null() {
            None
        } else {
            // SAFETY: a NUL-terminated string, per the contract.
            let text = unsafe { CStr::from_ptr(params.organs) };
            Some(text.to_str().map_err(|_| invalid("prosam_segment: organs is not UTF-8"))?.to_string())
        };
        let label_options = LabelOptions::parse(clean, organs.as_deref(), names)
            .map_err(|e| invalid(format!("prosam_segment: organs: {e}")))?;
        let needed = volume.dims.iter().map(|&d| d.max(0) as u128).product::<u128>();
        if (labels_len as u128) < needed {
            return Err(Failure(
                prosam_status::BufferTooSmall,
                format!("prosam_segment: labels holds {labels_len} bytes, the volume {needed} voxels"),
            ));
        }
        let checked = check_volume(volume).map_err(invalid)?;
        let budget = match params.max_memory_bytes {
            0 => MemoryBudget::effective(),
            n => MemoryBudget::new(n).capped(),
        };
        let shape = VolumeShape { dims: checked.dims, affine: checked.affine, read_bytes: 4 * checked.voxels() as u64 };
        let segmenter = model.segmenter.with_options(options);
        let what = || format!("prosam_segment: a {:?} volume", checked.dims);
        budget.check(segmenter.memory_need(&shape), what).map_err(from_runtime)?;
        // SAFETY: forwarded contract on the volume's data.
        let input = unsafe { gather(volume.data, &checked) }
            .ok_or_else(|| from_runtime(prosam_runtime::Error::Allocation { what: what(), bytes: shape.read_bytes }))?;
        let (callback, user_data) = (params.progress, params.progress_user_data as usize);
        let mut progress = move |done: usize, total: usize| -> bool {
            match callback {
                // The runtime's first call (0 of N, before any window) is not forwarded: the
                // header promises a call after every batch.
                // SAFETY: the caller's callback, called as its contract says.
                Some(f) if done > 0 => unsafe { f(done as i32, total as i32, user_data as *mut c_void) == 0 },
                _ => true,
            }
        };
        let mut result = model.pool.install(move || segmenter.segment(input, &mut progress)).map_err(from_runtime)?;
        label_options.apply(&mut result.labels, result.dims);
        // SAFETY: `labels` is writable for `labels_len` >= result.labels.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(result.labels.as_ptr(), labels, result.labels.len()) };
        log(
            prosam_log_level::Info,
            &format!(
                "segmented {:?} in {} windows ({:.2} s inference)",
                result.dims,
                result.windows,
                result.times.infer.as_secs_f64()
            ),
        );
        Ok(())
    })
}

/// For the Rust tests only: not an exported symbol of the C library.
#[doc(hidden)]
pub mod test_support {
    use super::*;

    /// Panics inside an entry point, so that tests can check that a panic becomes
    /// PROSAM_STATUS_INTERNAL, reaches the log callback and the process goes on.
    pub fn panic_inside_the_library() -> prosam_status {
        entry(|| panic!("deliberate test panic"))
    }
}
