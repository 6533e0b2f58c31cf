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

/// Whether `path` is a file with the DICOM preamble ("DICM" at byte 128).
pub fn is_dicom_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && &head[128..] == b"DICM"
}
