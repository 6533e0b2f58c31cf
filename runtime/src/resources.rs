//! Memory figures of the running process, for the CLI's reports (Linux `/proc`; `None` elsewhere).

/// A `kB` field of `/proc/self/status` in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// Resident set size now, in MiB.
pub fn resident_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// Peak resident set size of the process so far, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}
