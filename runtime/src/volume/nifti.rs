//! NIfTI-1 input (`.nii`, `.nii.gz`) and label-map output, with nibabel's reading rules.
//!
//! The header is validated here before anything else touches it: the nifti crate panics on some
//! malformed headers (qform with a bad qfac or quaternion) and scales with a NaN slope, so prosam
//! computes the affine and the scaling itself and hands the crate only the raw bytes to read.

use std::io::{BufRead, Read};
use std::path::Path;

use nifti::{Endianness, NiftiHeader, NiftiType};

use super::{Affine, Volume};
use crate::memory::{self, Admit, MemoryBudget, VolumeShape};
use crate::{Error, Result};

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Nifti { path: path.to_path_buf(), reason: reason.into() }
}

/// A NIfTI file read into memory: the volume in HU and the header it came with (the template of
/// the output's header).
#[derive(Debug)]
pub struct NiftiInput {
    pub volume: Volume,
    pub header: NiftiHeader,
}

/// Which affine a header's codes select (nibabel's `get_best_affine` order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffineSource {
    Sform,
    Qform,
    Pixdim,
}

/// Voxel types prosam reads, with their sizes.
fn element_size(t: NiftiType) -> Option<usize> {
    match t {
        NiftiType::Uint8 | NiftiType::Int8 => Some(1),
        NiftiType::Int16 | NiftiType::Uint16 => Some(2),
        NiftiType::Int32 | NiftiType::Float32 => Some(4),
        NiftiType::Float64 => Some(8),
        _ => None,
    }
}

/// The three spatial sizes, after checking the header's `dim` (a 4D file must hold one volume).
pub fn spatial_dims(h: &NiftiHeader) -> std::result::Result<[usize; 3], String> {
    let rank = h.dim[0] as usize;
    if !(1..=7).contains(&rank) {
        return Err(format!("dim[0] = {rank} is not a rank between 1 and 7"));
    }
    let sizes: Vec<usize> = (1..=7).map(|a| if a <= rank { h.dim[a] as usize } else { 1 }).collect();
    if let Some(a) = sizes[..rank].iter().position(|&s| s == 0) {
        return Err(format!("dimension {} has size 0 (dim = {:?})", a + 1, &h.dim[..=rank]));
    }
    let volumes: usize = sizes[3..].iter().product();
    if volumes > 1 {
        return Err(format!("holds {volumes} volumes (dim = {:?}); prosam segments one 3D volume", &h.dim[..=rank]));
    }
    Ok([sizes[0], sizes[1], sizes[2]])
}

/// nibabel's `quat2mat` for the unit quaternion (a, b, c, d).
fn quaternion_matrix(b: f64, c: f64, d: f64) -> std::result::Result<[[f64; 3]; 3], String> {
    let w2 = 1.0 - (b * b + c * c + d * d);
    // nibabel's `fillpositive` threshold for float32 quaternions: -3 eps.
    let a = if w2 < 0.0 {
        if w2 < -3.0 * f32::EPSILON as f64 {
            return Err(format!("qform quaternion ({b}, {c}, {d}) is longer than 1"));
        }
        0.0
    } else {
        w2.sqrt()
    };
    let n = a * a + b * b + c * c + d * d;
    let s = 2.0 / n;
    let (x2, y2, z2) = (b * s, c * s, d * s);
    let (wx, wy, wz) = (a * x2, a * y2, a * z2);
    let (xx, xy, xz) = (b * x2, b * y2, b * z2);
    let (yy, yz, zz) = (c * y2, c * z2, d * z2);
    Ok([[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]])
}

/// The voxel-to-world affine nibabel would give this header, and where it came from. Rejects
/// non-positive spacings, a qfac other than +-1 (0 counts as 1, as nibabel fixes it) and singular
/// or non-finite affines.
pub fn header_affine(h: &NiftiHeader, dims: [usize; 3]) -> std::result::Result<(Affine, AffineSource), String> {
    let pix = |a: usize| h.pixdim[a] as f64;
    let positive_spacing = || -> std::result::Result<(), String> {
        for a in 1..=3 {
            if !(pix(a).is_finite() && pix(a) > 0.0) {
                return Err(format!("voxel spacing pixdim[{a}] = {} is not positive", pix(a)));
            }
        }
        Ok(())
    };
    let (affine, source) = if h.sform_code != 0 {
        let row = |r: [f32; 4]| r.map(|v| v as f64);
        (Affine::from_rows([row(h.srow_x), row(h.srow_y), row(h.srow_z)]), AffineSource::Sform)
    } else if h.qform_code != 0 {
        positive_spacing()?;
        let qfac = match h.pixdim[0] {
            q if q == 0.0 || q == 1.0 => 1.0,
            -1.0 => -1.0,
            q => return Err(format!("qfac (pixdim[0]) is {q}, not 1 or -1")),
        };
        let r = quaternion_matrix(h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64)?;
        let zooms = [pix(1), pix(2), pix(3) * qfac];
        let mut rows = [[0.0; 4]; 3];
        let offset = [h.quatern_x, h.quatern_y, h.quatern_z];
        for i in 0..3 {
            for j in 0..3 {
                rows[i][j] = r[i][j] * zooms[j];
            }
            rows[i][3] = offset[i] as f64;
        }
        (Affine::from_rows(rows), AffineSource::Qform)
    } else {
        positive_spacing()?;
        let zooms = [-pix(1), pix(2), pix(3)];
        let mut rows = [[0.0; 4]; 3];
        for a in 0..3 {
            rows[a][a] = zooms[a];
            rows[a][3] = -zooms[a] * (dims[a] as f64 - 1.0) / 2.0;
        }
        (Affine::from_rows(rows), AffineSource::Pixdim)
    };
    if !affine.is_finite() {
        return Err(format!("the {source:?} affine has non-finite entries"));
    }
    if affine.inverse().is_none() {
        return Err(format!("the {source:?} affine is singular (a zero voxel size or collinear axes): {:?}", affine.0));
    }
    Ok((affine, source))
}

/// nibabel's scaling: `raw * slope + inter` when the slope is finite and non-zero, else none.
fn scaling(h: &NiftiHeader) -> std::result::Result<Option<(f64, f64)>, String> {
    let (slope, inter) = (h.scl_slope as f64, h.scl_inter as f64);
    if slope == 0.0 || !slope.is_finite() {
        return Ok(None);
    }
    if !inter.is_finite() {
        return Err(format!("scl_inter is {inter} with a valid scl_slope {slope}"));
    }
    Ok(Some((slope, inter)))
}

fn decode<const N: usize>(
    raw: &[u8],
    big_endian: bool,
    convert: impl Fn([u8; N]) -> f64 + Sync,
    scale: Option<(f64, f64)>,
) -> Vec<f32> {
    use rayon::prelude::*;
    raw.par_chunks_exact(N)
        .map(|c| {
            let mut b: [u8; N] = c.try_into().expect("chunk of N bytes");
            if big_endian {
                b.reverse();
            }
            let v = convert(b);
            (match scale {
                Some((s, i)) => v * s + i,
                None => v,
            }) as f32
        })
        .collect()
}

/// Reads a NIfTI-1 file (`.nii` or `.nii.gz`) into HU, within the machine's memory.
pub fn read(path: &Path) -> Result<NiftiInput> {
    read_admitting(path, &memory::admit_read(MemoryBudget::effective()))
}

/// Reads a NIfTI-1 file, asking `admit` before allocating for the voxels.
pub fn read_admitting(path: &Path, admit: Admit) -> Result<NiftiInput> {
    super::check_input_file(path)?;
    if path.is_dir() {
        return Err(bad(path, "is a folder, not a NIfTI file"));
    }
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    read_from(std::io::BufReader::new(file), path, admit)
}

/// Extensions larger than this are refused: skipping them costs time for nothing prosam uses.
const MAX_VOX_OFFSET: f64 = (1u64 << 30) as f64;

/// Reads a NIfTI-1 image from `source`, gzip-compressed or not (told apart by its first bytes, not
/// by a name); `path` names it in errors. Only the bytes the header declares are decompressed.
pub fn read_from(mut source: impl BufRead, path: &Path, admit: Admit) -> Result<NiftiInput> {
    let head = source.fill_buf().map_err(|e| bad(path, format!("cannot read: {e}")))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        read_stream(std::io::BufReader::new(flate2::bufread::GzDecoder::new(source)), path, admit)
    } else {
        read_stream(source, path, admit)
    }
}

fn read_stream(mut source: impl Read, path: &Path, admit: Admit) -> Result<NiftiInput> {
    let header = NiftiHeader::from_reader(&mut source)
        .map_err(|e| bad(path, format!("not a readable NIfTI-1 file: {}", io_reason(&e.to_string()))))?;
    match &header.magic {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err(bad(path, "a header-only NIfTI (.hdr with its voxels in a .img file); save it as one .nii"));
        }
        m => return Err(bad(path, format!("not a NIfTI-1 file (magic {m:?}, expected \"n+1\")"))),
    }
    let dims = spatial_dims(&header).map_err(|e| bad(path, e))?;
    let dtype = header.data_type().map_err(|_| bad(path, format!("unknown datatype code {}", header.datatype)))?;
    let size = element_size(dtype).ok_or_else(|| {
        bad(path, format!("voxel type {dtype:?} is not supported (int8/16/32, uint8/16, float32/64 are)"))
    })?;
    let (affine, _) = header_affine(&header, dims).map_err(|e| bad(path, e))?;
    let scale = scaling(&header).map_err(|e| bad(path, e))?;
    let offset = header.vox_offset as f64;
    if !(offset.is_finite() && (348.0..=MAX_VOX_OFFSET).contains(&offset)) {
        return Err(bad(path, format!("vox_offset {offset} is not between 348 and {MAX_VOX_OFFSET}")));
    }
    let voxels = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let voxels = voxels.ok_or_else(|| bad(path, "the dimensions overflow"))?;
    let need = voxels * size as u64;
    admit(&VolumeShape { dims, affine, read_bytes: need + memory::bytes_of(voxels, 4) })?;
    let need =
        usize::try_from(need).map_err(|_| bad(path, "the voxel data is larger than this machine can address"))?;

    let skip = offset as u64 - 348;
    let skipped = std::io::copy(&mut (&mut source).take(skip), &mut std::io::sink())
        .map_err(|e| bad(path, format!("cannot read the extensions: {}", io_reason(&e.to_string()))))?;
    if skipped < skip {
        return Err(bad(path, format!("truncated file: it ends before the voxel data at vox_offset {offset}")));
    }
    let mut raw = Vec::new();
    raw.try_reserve_exact(need)
        .map_err(|_| bad(path, format!("cannot allocate {} for the voxel data", memory::format_bytes(need as u64))))?;
    (&mut source)
        .take(need as u64)
        .read_to_end(&mut raw)
        .map_err(|e| bad(path, format!("cannot read the voxel data: {}", io_reason(&e.to_string()))))?;
    if raw.len() < need {
        return Err(bad(
            path,
            format!("truncated voxel data: {} bytes for {dims:?} of {dtype:?}, expected {need}", raw.len()),
        ));
    }
    let big = header.endianness == Endianness::Big;
    let data = match dtype {
        NiftiType::Uint8 => decode::<1>(&raw, big, |b| b[0] as f64, scale),
        NiftiType::Int8 => decode::<1>(&raw, big, |b| b[0] as i8 as f64, scale),
        NiftiType::Int16 => decode::<2>(&raw, big, |b| i16::from_le_bytes(b) as f64, scale),
        NiftiType::Uint16 => decode::<2>(&raw, big, |b| u16::from_le_bytes(b) as f64, scale),
        NiftiType::Int32 => decode::<4>(&raw, big, |b| i32::from_le_bytes(b) as f64, scale),
        NiftiType::Float32 => decode::<4>(&raw, big, |b| f32::from_le_bytes(b) as f64, scale),
        NiftiType::Float64 => decode::<8>(&raw, big, f64::from_le_bytes, scale),
        _ => unreachable!("element_size accepted only the types above"),
    };
    let volume = Volume { dims, data, affine };
    if let Some(bad_values) = volume.non_finite() {
        return Err(bad(path, bad_values.to_string()));
    }
    Ok(NiftiInput { volume, header })
}

/// An I/O error's text, with a short end of the stream called truncation.
fn io_reason(text: &str) -> String {
    if text.contains("UnexpectedEof") || text.contains("unexpected end") || text.contains("failed to fill") {
        format!("truncated file ({text})")
    } else {
        text.to_string()
    }
}

/// Writes a uint8 label map `labels` (stored order, `dims`) with `reference`'s geometry (sform,
/// qform, pixdim) and `description` (at most 79 bytes), through a temporary file and a rename.
pub fn write_labels(
    path: &Path,
    labels: &[u8],
    dims: [usize; 3],
    reference: &NiftiHeader,
    description: &str,
) -> Result<()> {
    write_array(path, reference, description, dims, labels.to_vec())
}

/// Writes a CT in HU as int16 NIfTI-1 (values rounded and clamped to -32768..32767) with sform
/// and qform from its affine, through a temporary file and a rename. `.nii.gz` compresses.
pub fn write_ct(path: &Path, volume: &Volume, description: &str) -> Result<()> {
    let values: Vec<i16> = volume.data.iter().map(|v| v.round().clamp(-32768.0, 32767.0) as i16).collect();
    write_array(path, &header_for(&volume.affine, volume.dims), description, volume.dims, values)
}

/// Writes `values` (x-fastest, `dims`) unscaled with `reference`'s geometry; the element type sets
/// the NIfTI datatype.
fn write_array<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    reference: &NiftiHeader,
    description: &str,
    dims: [usize; 3],
    values: Vec<T>,
) -> Result<()> {
    let mut header = reference.clone();
    let mut text = description.as_bytes().to_vec();
    text.truncate(79);
    header.descrip = text;
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    header.cal_min = 0.0;
    header.cal_max = 0.0;
    header.intent_code = 0;
    // The writer reads its array in logical [x, y, z] order; `values` is x-fastest (Fortran) order.
    let array = ndarray::Array3::from_shape_vec(ndarray::ShapeBuilder::f(dims), values)
        .map_err(|e| bad(path, format!("voxel buffer does not match {dims:?}: {e}")))?;
    prosam_models::temp_file::write_via_temp(path, |tmp| {
        nifti::writer::WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti(&array)
            .map_err(std::io::Error::other)
    })?;
    Ok(())
}

/// A header for a volume that came from elsewhere (a DICOM series): sform and qform both set to
/// `affine` (code 1, scanner anatomical), pixdim from its column lengths. The qform holds the
/// rotation part exactly for the orthogonal affines DICOM series give; for others it is the
/// nearest rotation, and readers use the sform, which NIfTI ranks first.
pub fn header_for(affine: &Affine, dims: [usize; 3]) -> NiftiHeader {
    let m = affine.0;
    let spacing = affine.spacing();
    let qfac = if affine.det3() < 0.0 { -1.0 } else { 1.0 };
    // Unit columns, the third negated for a left-handed affine (NIfTI's qfac).
    let r: [[f64; 3]; 3] =
        std::array::from_fn(|i| std::array::from_fn(|j| m[i][j] / spacing[j] * if j == 2 { qfac } else { 1.0 }));
    let (b, c, d) = quaternion_of(r);
    let mut header = NiftiHeader {
        sform_code: 1,
        qform_code: 1,
        srow_x: m[0].map(|v| v as f32),
        srow_y: m[1].map(|v| v as f32),
        srow_z: m[2].map(|v| v as f32),
        quatern_b: b as f32,
        quatern_c: c as f32,
        quatern_d: d as f32,
        quatern_x: m[0][3] as f32,
        quatern_y: m[1][3] as f32,
        quatern_z: m[2][3] as f32,
        xyzt_units: 2, // millimetres
        ..Default::default()
    };
    header.dim = [3, dims[0] as u16, dims[1] as u16, dims[2] as u16, 1, 1, 1, 1];
    header.pixdim = [qfac as f32, spacing[0] as f32, spacing[1] as f32, spacing[2] as f32, 1.0, 1.0, 1.0, 1.0];
    header
}

/// The (b, c, d) of the unit quaternion with a >= 0 for a rotation matrix (the NIfTI reference
/// `nifti_mat44_to_quatern`, on a matrix already orthonormal).
fn quaternion_of(r: [[f64; 3]; 3]) -> (f64, f64, f64) {
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        let a2 = 0.5 * trace.sqrt();
        a = a2;
        b = 0.25 * (r[2][1] - r[1][2]) / a2;
        c = 0.25 * (r[0][2] - r[2][0]) / a2;
        d = 0.25 * (r[1][0] - r[0][1]) / a2;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            let b2 = 0.5 * xd.sqrt();
            b = b2;
            c = 0.25 * (r[0][1] + r[1][0]) / b2;
            d = 0.25 * (r[0][2] + r[2][0]) / b2;
            a = 0.25 * (r[2][1] - r[1][2]) / b2;
        } else if yd > 1.0 {
            let c2 = 0.5 * yd.sqrt();
            c = c2;
            b = 0.25 * (r[0][1] + r[1][0]) / c2;
            d = 0.25 * (r[1][2] + r[2][1]) / c2;
            a = 0.25 * (r[0][2] - r[2][0]) / c2;
        } else {
            let d2 = 0.5 * zd.sqrt();
            d = d2;
            b = 0.25 * (r[0][2] + r[2][0]) / d2;
            c = 0.25 * (r[1][2] + r[2][1]) / d2;
            a = 0.25 * (r[1][0] - r[0][1]) / d2;
        }
    }
    if a < 0.0 { (-b, -c, -d) } else { (b, c, d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_for_round_trips_sform_and_qform() {
        let c = (0.3f64).cos();
        let s = (0.3f64).sin();
        // A rotation about z, a flipped first axis (left-handed), anisotropic voxels.
        let affines = [
            Affine::from_rows([[-0.977, 0.0, 0.0, 249.5], [0.0, 0.977, 0.0, -61.5], [0.0, 0.0, 2.0, -804.5]]),
            Affine::from_rows([[c * 0.7, -s * 0.8, 0.0, 10.0], [s * 0.7, c * 0.8, 0.0, -4.0], [0.0, 0.0, 1.5, 3.0]]),
            Affine::from_rows([[0.0, 0.0, -2.0, 1.0], [-1.0, 0.0, 0.0, 2.0], [0.0, 1.5, 0.0, 3.0]]),
        ];
        for affine in affines {
            let mut h = header_for(&affine, [4, 5, 6]);
            for (sform, qform) in [(1, 1), (0, 1)] {
                h.sform_code = sform;
                h.qform_code = qform;
                let (got, _) = header_affine(&h, [4, 5, 6]).unwrap();
                for i in 0..3 {
                    for j in 0..4 {
                        assert!((got.0[i][j] - affine.0[i][j]).abs() < 1e-5, "{sform}/{qform}: {got:?} vs {affine:?}");
                    }
                }
            }
        }
    }
}
