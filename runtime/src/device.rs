//! Compute devices: the CPU always, CUDA and Metal when prosam is built with their features.
//!
//! Every op prosam adds to Candle has a fused CPU kernel and a portable formulation in Candle's
//! tensor ops; on CUDA and Metal the portable one runs (and int8 weights are widened to f16 at
//! load), so no device lacks an op.

pub use candle_core::{DType, Device};
use prosam_models::format::Precision;

use crate::{Error, Result};

/// A device named on the command line or in the C API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// An NVIDIA GPU by ordinal (`cuda`, `cuda:1`).
    Cuda(usize),
    /// An Apple GPU by ordinal (`metal`).
    Metal(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => {
                let n = n.parse().map_err(|_| Error::Options(format!("device {s:?}: {n:?} is not a device number")))?;
                (k, n)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(ordinal)),
            "metal" => Ok(DeviceChoice::Metal(ordinal)),
            _ => Err(Error::Options(format!("unknown device {s:?}; choose cpu, cuda[:N] or metal[:N]"))),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Whether this build was compiled with the device's backend.
    pub fn compiled(&self) -> bool {
        match self {
            DeviceChoice::Cpu => true,
            DeviceChoice::Cuda(_) => cfg!(feature = "cuda"),
            DeviceChoice::Metal(_) => cfg!(feature = "metal"),
        }
    }

    /// Opens the device. A backend this build lacks, or a GPU the machine lacks, is an
    /// [`Error::Device`] that says which, and how to get it.
    pub fn open(&self) -> Result<Device> {
        let missing = |name: &str, feature: &str, needs: &str| {
            Error::Device(format!(
                "{self}: this prosam was built without {name} support; rebuild it with `--features {feature}` \
                 ({needs})"
            ))
        };
        match *self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(_) if !self.compiled() => {
                Err(missing("CUDA", "cuda", "or `cudnn`; needs the NVIDIA CUDA toolkit's nvcc at build time"))
            }
            DeviceChoice::Metal(_) if !self.compiled() => Err(missing("Metal", "metal", "on macOS with Apple silicon")),
            DeviceChoice::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| Error::Device(format!("{self}: no usable CUDA device {n}: {e}")))
            }
            DeviceChoice::Metal(n) => {
                Device::new_metal(n).map_err(|e| Error::Device(format!("{self}: no usable Metal device {n}: {e}")))
            }
        }
    }
}

/// The element type a model stored in `precision` computes in on `device`. The CPU computes in
/// f32 whatever the file (Candle's f16 matrix products are several times slower there); GPUs
/// compute f32 files in f32 and f16 and int8 files in f16.
pub fn compute_dtype(device: &Device, precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        _ if device.is_cpu() => DType::F32,
        Precision::F16 | Precision::Int8 => DType::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_missing_backends_say_how_to_get_them() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(1));
        assert_eq!("metal".parse::<DeviceChoice>().unwrap(), DeviceChoice::Metal(0));
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().to_string().contains("cpu, cuda[:N] or metal[:N]"));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let e = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("without CUDA support") && e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            let e = DeviceChoice::Metal(0).open().unwrap_err().to_string();
            assert!(e.contains("without Metal support") && e.contains("--features metal"), "{e}");
        }
        assert_eq!(compute_dtype(&Device::Cpu, Precision::F16), DType::F32);
    }
}
