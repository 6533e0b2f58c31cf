//! Memory figures of the running process and the machine, for the CLI's reports and the memory
//! budget (Linux `/proc`; `None` elsewhere).

/// The most compute threads prosam starts: far more than any CPU prosam runs on has cores, and
/// few enough that a mistyped count (`--threads 1000000`) is an error, not a hang.
pub const MAX_THREADS: usize = 1024;

/// A thread count between 1 and [`MAX_THREADS`], or why not.
pub fn check_threads(threads: usize) -> Result<(), String> {
    if threads == 0 || threads > MAX_THREADS {
        return Err(format!("{threads} threads is outside 1..={MAX_THREADS}"));
    }
    Ok(())
}

/// A `kB` field (`VmRSS:`, `MemTotal:`) of a `/proc` file such as `/proc/self/status`, in kB.
pub fn proc_kb(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// A `kB` field of `/proc/self/status` in MiB.
fn status_mib(field: &str) -> Option<f64> {
    proc_kb("/proc/self/status", field).map(|kb| kb as f64 / 1024.0)
}

/// Resident set size now, in MiB.
pub fn resident_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// Peak resident set size of the process so far, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Asks glibc's allocator to keep freed memory for reuse instead of returning it to the kernel.
///
/// A forward pass allocates and frees tensors of tens of megabytes (a 96^3 volume of 12 channels
/// is 42 MB). By default glibc serves each from a fresh `mmap` and unmaps it on free, so every
/// tensor's pages are faulted in and zeroed again: a quarter of a window's time on the
/// development machine. With mmap off and a high trim threshold, freed blocks go back to the
/// heap and are reused; the process keeps its peak footprint instead of shrinking between
/// windows. Call it once, early; the CLIs do. A no-op on other C libraries.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands the heap's free memory back to the kernel (glibc's `malloc_trim`) once a phase has freed
/// its tensors. With [`retain_freed_memory`] the heap otherwise stays at the inference's extent,
/// and the next phase (cleaning and writing the labels) grows it further whenever its blocks do
/// not fit the holes the windows left: the whole-volume peak had varied by 250 MB from run to run
/// that way. A no-op on other C libraries.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; live blocks are untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
