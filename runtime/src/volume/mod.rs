//! CT volumes: voxels, their voxel-to-world affine, and the readers and writers.

pub mod affine;
pub mod dicom;
pub mod dicom_seg;
pub mod nifti;
pub mod orientation;
pub mod resample;

pub use affine::Affine;
pub use orientation::Orientation;

/// A scalar volume as stored in NIfTI: `data[i + nx * (j + ny * k)]` for `dims = [nx, ny, nz]`,
/// values in HU (after the file's scaling), `affine` mapping voxel (i, j, k) to RAS+ millimetres.
#[derive(Debug, Clone)]
pub struct Volume {
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    pub affine: Affine,
}

impl Volume {
    /// Element strides of the three axes in `data`.
    pub fn strides(&self) -> [usize; 3] {
        [1, self.dims[0], self.dims[0] * self.dims[1]]
    }

    pub fn voxel_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The voxels that are NaN or infinite, if any: one would spread through every window the
    /// resampling and the network touch, and erase the organs there without a word.
    pub fn non_finite(&self) -> Option<NonFinite> {
        NonFinite::find(&self.data, self.dims)
    }
}

/// Non-finite values in a volume: how many, and the first one's voxel (i, j, k) in stored order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub count: usize,
    pub first: [usize; 3],
}

impl NonFinite {
    /// Scans `data` (x fastest, `dims`).
    pub fn find(data: &[f32], dims: [usize; 3]) -> Option<NonFinite> {
        use rayon::prelude::*;
        let count = data.par_iter().filter(|v| !v.is_finite()).count();
        if count == 0 {
            return None;
        }
        let at = data.iter().position(|v| !v.is_finite()).expect("counted above");
        let first = [at % dims[0], at / dims[0] % dims[1], at / (dims[0] * dims[1])];
        Some(NonFinite { count, first })
    }
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [i, j, k] = self.first;
        write!(
            f,
            "{} non-finite voxel value(s) (NaN or infinite, after the file's scaling), the first at voxel ({i}, {j}, {k}); \
             prosam refuses them rather than let them erase the organs around them",
            self.count
        )
    }
}

/// A CT as read from disk, with what its writers need: the NIfTI header to copy, or the DICOM
/// series to reference.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per run; boxing would only add an indirection
pub enum CtInput {
    Nifti(nifti::NiftiInput),
    Dicom(dicom::DicomInput),
}

impl CtInput {
    /// Reads a NIfTI-1 file or a folder holding a DICOM series (`series` picks one of several; see
    /// [`dicom::Scan::select`]), asking `admit` before allocating for the voxels.
    pub fn read(path: &std::path::Path, series: Option<&str>, admit: crate::memory::Admit) -> crate::Result<CtInput> {
        check_input_file(path)?;
        if path.is_dir() {
            return Ok(CtInput::Dicom(dicom::read_admitting(path, series, admit)?));
        }
        if is_dicom_file(path) {
            return Err(crate::Error::Dicom {
                path: path.to_path_buf(),
                reason: "is one DICOM file; give the folder that holds its series".into(),
            });
        }
        if series.is_some() {
            return Err(crate::Error::Options(format!("{}: --series applies to a DICOM folder", path.display())));
        }
        Ok(CtInput::Nifti(nifti::read_admitting(path, admit)?))
    }

    pub fn volume(&self) -> &Volume {
        match self {
            CtInput::Nifti(n) => &n.volume,
            CtInput::Dicom(d) => &d.volume,
        }
    }

    /// Takes the voxels out (to hand them to the pipeline), leaving the rest.
    pub fn take_volume(&mut self) -> Volume {
        let v = match self {
            CtInput::Nifti(n) => &mut n.volume,
            CtInput::Dicom(d) => &mut d.volume,
        };
        Volume { dims: v.dims, data: std::mem::take(&mut v.data), affine: v.affine }
    }

    /// The header a NIfTI label map on this CT's grid is written with.
    pub fn nifti_header(&self) -> ::nifti::NiftiHeader {
        match self {
            CtInput::Nifti(n) => n.header.clone(),
            CtInput::Dicom(d) => nifti::header_for(&d.volume.affine, d.volume.dims),
        }
    }
}

/// Refuses an input that is missing, or is neither a file nor a folder (a FIFO would block the
/// reader until something writes to it; a device is no CT), saying which.
pub fn check_input_file(path: &std::path::Path) -> crate::Result<()> {
    let reason = match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.is_dir() => return Ok(()),
        Ok(_) => "is not a regular file (a device, FIFO or socket); give a NIfTI file or a DICOM folder",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file or folder",
        Err(source) => return Err(crate::Error::Io { path: path.to_path_buf(), source }),
    };
    Err(crate::Error::Nifti { path: path.to_path_buf(), reason: reason.into() })
}

/// Serialises a path as a string, with any bytes that are not UTF-8 (a Latin-1 folder name from an
/// old PACS export) replaced by U+FFFD: serde's own path serialiser fails on them.
pub fn lossy_path<S: serde::Serializer>(path: &std::path::Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// Whether `path` is a file with the DICOM preamble ("DICM" at byte 128).
pub fn is_dicom_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && &head[128..] == b"DICM"
}
