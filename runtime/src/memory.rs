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

    /// The machine's physical memory, the default: a run that needs more can only end in swap
    /// or the OOM killer. Unlimited where the figure is unknown (no Linux `/proc/meminfo`).
    pub fn machine() -> Self {
        crate::resources::proc_kb("/proc/meminfo", "MemTotal:").map_or(Self::UNLIMITED, |kb| MemoryBudget(kb * 1024))
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
        assert!(MemoryBudget::machine().bytes() > 1 << 20);
    }
}
