//! Memory figures of the running process and the machine, for the CLI's reports and the memory
//! budget (Linux `/proc`; `None` elsewhere).

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
