//! The NIfTI reader: voxel types, scaling as nibabel applies it, and the affine from sform,
//! qform or pixdim.

mod common;

use std::path::{Path, PathBuf};

use prosam_runtime::volume::nifti;

/// A minimal single-file NIfTI-1 image: 348-byte header, 4 bytes of extension flags, data.
struct Header {
    bytes: Vec<u8>,
}

impl Header {
    fn new(dims: &[u16], datatype: i16, bitpix: i16) -> Self {
        let mut h = Header { bytes: vec![0u8; 352] };
        h.i32(0, 348);
        h.i16(40, dims.len() as i16);
        for (a, &d) in dims.iter().enumerate() {
            h.i16(42 + 2 * a, d as i16);
        }
        h.i16(70, datatype);
        h.i16(72, bitpix);
        for a in 0..8 {
            h.f32(76 + 4 * a, 1.0);
        }
        h.f32(108, 352.0);
        h.bytes[344..348].copy_from_slice(b"n+1\0");
        h
    }
    fn i16(&mut self, at: usize, v: i16) -> &mut Self {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, at: usize, v: i32) -> &mut Self {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn f32(&mut self, at: usize, v: f32) -> &mut Self {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn write(&self, path: &Path, data: &[u8]) -> PathBuf {
        let mut all = self.bytes.clone();
        all.extend_from_slice(data);
        std::fs::write(path, all).unwrap();
        path.to_path_buf()
    }
}

const SCL_SLOPE: usize = 112;
const SCL_INTER: usize = 116;
const PIXDIM: usize = 76;
const QFORM_CODE: usize = 252;
const SFORM_CODE: usize = 254;
const QUATERN_B: usize = 256;
const SROW_X: usize = 280;

#[test]
fn voxel_types_and_scaling() {
    let dir = common::scratch_dir("nifti_read_types");
    let values = [-3i32, 0, 7, 100];
    let cases: [(i16, i16, Vec<u8>); 7] = [
        (2, 8, values.iter().map(|&v| (v + 3) as u8).collect()),
        (256, 8, values.iter().flat_map(|&v| (v as i8).to_le_bytes()).collect()),
        (4, 16, values.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect()),
        (512, 16, values.iter().flat_map(|&v| ((v + 3) as u16).to_le_bytes()).collect()),
        (8, 32, values.iter().flat_map(|&v| v.to_le_bytes()).collect()),
        (16, 32, values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()),
        (64, 64, values.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect()),
    ];
    for (datatype, bitpix, data) in cases {
        let unsigned = datatype == 2 || datatype == 512;
        let expect = |slope: f32, inter: f32| -> Vec<f32> {
            values.iter().map(|&v| (if unsigned { v + 3 } else { v }) as f32 * slope + inter).collect()
        };
        let mut h = Header::new(&[4, 1, 1], datatype, bitpix);
        let path = h.write(&dir.join(format!("t{datatype}.nii")), &data);
        assert_eq!(nifti::read(&path).unwrap().volume.data, expect(1.0, 0.0), "datatype {datatype}");
        h.f32(SCL_SLOPE, 2.0).f32(SCL_INTER, -1024.0);
        let path = h.write(&dir.join(format!("s{datatype}.nii")), &data);
        assert_eq!(nifti::read(&path).unwrap().volume.data, expect(2.0, -1024.0), "scaled datatype {datatype}");
        // nibabel: a zero or NaN slope means no scaling at all.
        for slope in [0.0, f32::NAN] {
            h.f32(SCL_SLOPE, slope);
            let path = h.write(&dir.join(format!("n{datatype}.nii")), &data);
            assert_eq!(nifti::read(&path).unwrap().volume.data, expect(1.0, 0.0), "slope {slope}, datatype {datatype}");
        }
    }
    let mut h = Header::new(&[2, 1, 1], 16, 32);
    h.f32(SCL_SLOPE, 1.0).f32(SCL_INTER, f32::INFINITY);
    let path = h.write(&dir.join("badinter.nii"), &[0u8; 8]);
    assert!(nifti::read(&path).unwrap_err().to_string().contains("scl_inter"));
    let path = Header::new(&[2, 2, 2], 1024, 64).write(&dir.join("u32.nii"), &[0u8; 64]);
    assert!(nifti::read(&path).unwrap_err().to_string().contains("not supported"));
}

#[test]
fn affines_follow_nibabel() {
    let dir = common::scratch_dir("nifti_read_affine");
    let data = vec![0u8; 4 * 3 * 2 * 2];
    // pixdim only: diag(-px, py, pz), centred on the volume.
    let mut h = Header::new(&[4, 3, 2], 4, 16);
    h.f32(PIXDIM + 4, 0.5).f32(PIXDIM + 8, 2.0).f32(PIXDIM + 12, 3.0);
    let a = nifti::read(&h.write(&dir.join("pixdim.nii"), &data)).unwrap().volume.affine;
    assert_eq!(a.0[0], [-0.5, 0.0, 0.0, 0.75]);
    assert_eq!(a.0[1], [0.0, 2.0, 0.0, -2.0]);
    assert_eq!(a.0[2], [0.0, 0.0, 3.0, -1.5]);
    // qform: a 90 degree turn about z (b = c = 0, d = sin 45), qfac -1, offsets.
    let s = std::f32::consts::FRAC_1_SQRT_2;
    h.i16(QFORM_CODE, 1)
        .f32(PIXDIM, -1.0)
        .f32(QUATERN_B + 8, s)
        .f32(QUATERN_B + 12, 10.0)
        .f32(QUATERN_B + 16, 20.0)
        .f32(QUATERN_B + 20, 30.0);
    let a = nifti::read(&h.write(&dir.join("qform.nii"), &data)).unwrap().volume.affine;
    let expect = [[0.0, -2.0, 0.0, 10.0], [0.5, 0.0, 0.0, 20.0], [0.0, 0.0, -3.0, 30.0]];
    for r in 0..3 {
        for c in 0..4 {
            assert!((a.0[r][c] - expect[r][c]).abs() < 1e-6, "qform affine {:?}", a.0);
        }
    }
    h.f32(PIXDIM, 0.5);
    assert!(nifti::read(&h.write(&dir.join("qfac.nii"), &data)).unwrap_err().to_string().contains("qfac"));
    // sform wins over qform.
    h.f32(PIXDIM, 1.0).i16(SFORM_CODE, 2);
    let rows = [[0.0f32, 0.0, 1.5, -7.0], [0.0, -1.0, 0.0, 4.0], [2.5, 0.0, 0.0, 1.0]];
    for (r, row) in rows.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            h.f32(SROW_X + 16 * r + 4 * c, v);
        }
    }
    let a = nifti::read(&h.write(&dir.join("sform.nii"), &data)).unwrap().volume.affine;
    for r in 0..3 {
        assert_eq!(a.0[r], rows[r].map(|v| v as f64));
    }
    // A 4D file with one volume is a 3D volume.
    let mut one = Header::new(&[4, 3, 2, 1], 4, 16);
    let v = nifti::read(&one.write(&dir.join("4d.nii"), &data)).unwrap().volume;
    assert_eq!(v.dims, [4, 3, 2]);
    one.i16(48, 3);
    assert!(nifti::read(&one.write(&dir.join("4d3.nii"), &[0u8; 144])).unwrap_err().to_string().contains("3 volumes"));
}
