//! CT volumes: voxels, their voxel-to-world affine, and the readers and writers.

pub mod affine;
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
