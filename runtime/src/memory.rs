//! The memory budget: what one run may allocate, checked against estimates made from headers
//! before any voxel is read, so that a file claiming 100000^3 voxels is an error that names the
//! need and the budget, not an allocation attempt.

use crate::volume::Affine;
use crate::{Error, Result};

/// A cap on the bytes one run may hold at its peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget(u64);

impl MemoryBudget {
    pub const UNLIMITED: MemoryBudget = MemoryBudget(u64::MAX);

    pub const fn new(bytes: u64) -> Self {
        MemoryBudget(bytes)
    }

    /// The default budget: [`EFFECTIVE_SHARE`] of the smallest limit this process runs under, so
    /// that a run that cannot fit is refused instead of ending in an allocation failure (an abort),
    /// swap or the OOM killer. The limits: physical memory (`/proc/meminfo`), the cgroup's
    /// `memory.max` (v2; `memory.limit_in_bytes` in v1) less what the cgroup already uses besides
    /// this process, and the address-space limit (RLIMIT_AS, `ulimit -v`) less what the process
    /// already maps (its code, the loaded model, thread stacks and heap: `VmSize`).
    /// Unlimited where none is known.
    pub fn effective() -> Self {
        let limit =
            [physical_bytes(), cgroup_available_bytes(), address_space_available_bytes()].into_iter().flatten().min();
        limit.map_or(Self::UNLIMITED, |bytes| MemoryBudget((bytes as f64 * EFFECTIVE_SHARE) as u64))
    }

    /// This budget, or the effective one ([`MemoryBudget::effective`]) where that is smaller: a
    /// budget above what the process can allocate would only let a run abort.
    pub fn capped(self) -> Self {
        MemoryBudget(self.0.min(Self::effective().0))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `4G`, `512M`, `1.5GiB`, `800MB` or a plain byte count. Units are binary (K = 1024).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let value: f64 =
            number.parse().map_err(|_| format!("`{text}` is not a size such as 4G, 512M or 1500000000"))?;
        let scale = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
            "" => 1u64,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            u => return Err(format!("`{text}`: unknown unit `{u}` (use K, M, G or T)")),
        };
        let bytes = value * scale as f64;
        if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(format!("`{text}` is not a usable memory budget"));
        }
        Ok(MemoryBudget(bytes as u64))
    }

    /// An error naming `what`, its need and the budget when `need` is over it.
    pub fn check(self, need: u64, what: impl FnOnce() -> String) -> Result<()> {
        if need > self.0 { Err(Error::Memory { what: what(), need, budget: self.0 }) } else { Ok(()) }
    }
}

/// The share of the smallest memory limit that the default budget allows: the rest is headroom
/// for what the estimates do not count (allocator fragmentation, the C library's own buffers).
pub const EFFECTIVE_SHARE: f64 = 0.9;

fn physical_bytes() -> Option<u64> {
    crate::resources::proc_kb("/proc/meminfo", "MemTotal:").map(|kb| kb.saturating_mul(1024))
}

/// The cgroup's memory limit less what the rest of the cgroup uses (its usage less this process's
/// resident memory), where a limit is set.
fn cgroup_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read_u64 = |path: String| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    let own = crate::resources::proc_kb("/proc/self/status", "VmRSS:").unwrap_or(0).saturating_mul(1024);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (limit, usage) = if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            (read_u64(format!("{dir}/memory.max")), read_u64(format!("{dir}/memory.current")))
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (read_u64(format!("{dir}/memory.limit_in_bytes")), read_u64(format!("{dir}/memory.usage_in_bytes")))
        } else {
            continue;
        };
        // "max" (v2) does not parse; v1 writes a huge number for no limit.
        if let Some(limit) = limit.filter(|&l| l < 1 << 60) {
            let others = usage.unwrap_or(0).saturating_sub(own);
            return Some(limit.saturating_sub(others));
        }
    }
    None
}

/// RLIMIT_AS less the address space the process already uses, where a limit is set.
fn address_space_available_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        let used = crate::resources::proc_kb("/proc/self/status", "VmSize:")?.saturating_mul(1024);
        Some(limit.rlim_cur.saturating_sub(used))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::UNLIMITED { f.write_str("unlimited") } else { f.write_str(&format_bytes(self.0)) }
    }
}

/// `1536 MiB` as `1.50 GiB`, and so on.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.2} {}", UNITS[unit]) }
}

/// What a reader knows of a volume before it reads the voxels: enough to decide whether the run
/// fits in the budget.
#[derive(Debug, Clone, Copy)]
pub struct VolumeShape {
    pub dims: [usize; 3],
    pub affine: Affine,
    /// The reader's own peak: the decoded float32 voxels plus the buffers it decodes from.
    pub read_bytes: u64,
}

impl VolumeShape {
    pub fn voxels(&self) -> u64 {
        self.dims.iter().map(|&d| d as u64).fold(1, u64::saturating_mul)
    }
}

/// Called by the readers with the volume's shape before they allocate for its voxels; an error
/// stops the read.
pub type Admit<'a> = &'a dyn Fn(&VolumeShape) -> Result<()>;

/// Admits a read whose own need fits in `budget` (for callers that only read).
pub fn admit_read(budget: MemoryBudget) -> impl Fn(&VolumeShape) -> Result<()> {
    move |shape| {
        budget.check(shape.read_bytes, || {
            format!("reading a {} x {} x {} volume", shape.dims[0], shape.dims[1], shape.dims[2])
        })
    }
}

/// `a * b` in u64, saturating: estimates of absurd headers must not wrap to small numbers.
pub fn bytes_of(count: u64, size: u64) -> u64 {
    count.saturating_mul(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(MemoryBudget::parse("4G").unwrap().bytes(), 4 << 30);
        assert_eq!(MemoryBudget::parse("512M").unwrap().bytes(), 512 << 20);
        assert_eq!(MemoryBudget::parse("1.5GiB").unwrap().bytes(), 3 << 29);
        assert_eq!(MemoryBudget::parse("800mb").unwrap().bytes(), 800 << 20);
        assert_eq!(MemoryBudget::parse("123456").unwrap().bytes(), 123456);
        for bad in ["", "G", "-1G", "4X", "0", "1e400"] {
            assert!(MemoryBudget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_name_the_need_and_the_budget() {
        let budget = MemoryBudget::new(1 << 30);
        assert!(budget.check(1 << 30, || unreachable!()).is_ok());
        let text = budget.check(3 << 29, || "segmenting ct.nii".into()).unwrap_err().to_string();
        assert!(text.contains("segmenting ct.nii") && text.contains("1.50 GiB") && text.contains("1.00 GiB"), "{text}");
        assert_eq!(format_bytes(1000), "1000 bytes");
        assert!(MemoryBudget::effective().bytes() > 1 << 20);
        // The effective budget moves with the process's own use; its bound by physical memory does not.
        let physical = physical_bytes().unwrap() as f64 * EFFECTIVE_SHARE;
        assert!((MemoryBudget::new(u64::MAX).capped().bytes() as f64) <= physical);
        assert_eq!(MemoryBudget::new(1 << 20).capped(), MemoryBudget::new(1 << 20));
    }
}
