//! NumPy `.npy` arrays (format versions 1-3): read as f32, written as little-endian f32.
//!
//! Only what the raw-network commands need: little-endian or byte-order-free numeric dtypes,
//! C or Fortran order. Every malformed header or short file is an error naming the problem.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A dense array in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Element types this reader converts to f32.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F64,
    F16,
    I16,
    I32,
    U8,
    U16,
}

impl Elem {
    fn parse(descr: &str) -> Option<Self> {
        let (order, code) = (descr.get(..1)?, descr.get(1..)?);
        let little = matches!(order, "<" | "|" | "=");
        match (little, code) {
            (true, "f4") => Some(Elem::F32),
            (true, "f8") => Some(Elem::F64),
            (true, "f2") => Some(Elem::F16),
            (true, "i2") => Some(Elem::I16),
            (true, "i4") => Some(Elem::I32),
            (true, "u1") => Some(Elem::U8),
            (true, "u2") => Some(Elem::U16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::F16 | Elem::I16 | Elem::U16 => 2,
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 => 8,
        }
    }

    fn decode(self, b: &[u8]) -> f32 {
        match self {
            Elem::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Elem::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            Elem::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Elem::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            Elem::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Elem::U8 => b[0] as f32,
            Elem::U16 => u16::from_le_bytes([b[0], b[1]]) as f32,
        }
    }
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = (bits >> 10) & 0x1f;
    let frac = (bits & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        0x1f if frac == 0.0 => f32::INFINITY,
        0x1f => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e as i32 - 15),
    }
}

/// The three fields of an npy header dict.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }`.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let text = text.trim_end_matches(['\n', ' ', '\0']).trim();
    let body = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).ok_or("the header is not a Python dict")?;
    let value_of = |key: &str| -> std::result::Result<&str, String> {
        let tag = format!("'{key}':");
        let at = body.find(&tag).ok_or(format!("the header has no '{key}'"))?;
        Ok(body[at + tag.len()..].trim_start())
    };
    let descr = value_of("descr")?;
    let descr =
        descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("'descr' is not a string")?.to_string();
    let fortran = value_of("fortran_order")?;
    let fortran_order = if fortran.starts_with("True") {
        true
    } else if fortran.starts_with("False") {
        false
    } else {
        return Err("'fortran_order' is neither True nor False".into());
    };
    let shape_text = value_of("shape")?;
    let inner = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("'shape' is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("'shape' holds `{s}`, not a size")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Header { descr, fortran_order, shape })
}

/// Parses npy bytes into a C-order f32 array.
pub fn parse(bytes: &[u8]) -> std::result::Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a NumPy .npy file (missing the \\x93NUMPY magic)".into());
    }
    let (len_size, header_start) = match bytes[6] {
        1 => (2, 10),
        2 | 3 => (4, 12),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if bytes.len() < header_start {
        return Err("truncated .npy header".into());
    }
    let header_len = if len_size == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_start =
        header_start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or("truncated .npy header")?;
    let text = std::str::from_utf8(&bytes[header_start..data_start]).map_err(|_| "the .npy header is not text")?;
    let header = parse_header(text).map_err(|e| format!("bad .npy header: {e}"))?;
    let elem = Elem::parse(&header.descr).ok_or_else(|| {
        format!("unsupported dtype '{}' (expected little-endian float32/64/16, int16/32, uint8/16)", header.descr)
    })?;
    let count = header.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("the shape overflows")?;
    let need = count.checked_mul(elem.size()).ok_or("the shape overflows")?;
    let have = bytes.len() - data_start;
    if have < need {
        return Err(format!(
            "truncated: shape {:?} of '{}' needs {need} data bytes, the file has {have}",
            header.shape, header.descr
        ));
    }
    if have > need {
        return Err(format!("{} bytes of trailing data after the array of shape {:?}", have - need, header.shape));
    }
    let raw = &bytes[data_start..];
    let values: Vec<f32> = raw.chunks_exact(elem.size()).map(|b| elem.decode(b)).collect();
    let data =
        if header.fortran_order && header.shape.len() > 1 { fortran_to_c(&values, &header.shape) } else { values };
    Ok(Array { shape: header.shape, data })
}

/// Reorders a column-major array into row-major order.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let rank = shape.len();
    let mut f_strides = vec![1usize; rank];
    for a in 1..rank {
        f_strides[a] = f_strides[a - 1] * shape[a - 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; rank];
    for _ in 0..values.len() {
        out.push(values[index.iter().zip(&f_strides).map(|(i, s)| i * s).sum::<usize>()]);
        for a in (0..rank).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
    out
}

/// Reads a `.npy` file as f32.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse(&bytes).map_err(|reason| Error::Npy { path: path.to_path_buf(), reason })
}

/// The bytes of a version 1.0 `.npy` file holding `data` as little-endian f32 in C order.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len(), "shape and data disagree");
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad with spaces so that the data starts on a 64-byte boundary, ending with a newline.
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `data` as a float32 `.npy` file, through a temporary file and a rename.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes = encode_f32(shape, data);
    Ok(prosam_models::format::write_atomically(path, |f| f.write_all(&bytes))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replaces one header string by another of the same length.
    fn patch(mut bytes: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("pattern in header");
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        bytes
    }

    #[test]
    fn round_trip() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes = encode_f32(&[2, 3, 4], &data);
        assert_eq!((bytes.len() - 4 * 24) % 64, 0, "data is 64-byte aligned");
        assert_eq!(parse(&bytes).unwrap(), Array { shape: vec![2, 3, 4], data });
    }

    #[test]
    fn fortran_order_is_transposed() {
        // numpy.asfortranarray(numpy.arange(6, dtype='<f4').reshape(2, 3)) stores 0 3 1 4 2 5.
        let bytes = patch(encode_f32(&[2, 3], &[0., 3., 1., 4., 2., 5.]), "False,", "True ,");
        assert_eq!(parse(&bytes).unwrap().data, vec![0., 1., 2., 3., 4., 5.]);
    }

    #[test]
    fn other_dtypes_convert() {
        let bytes = encode_f32(&[2], &[0.0, 0.0]);
        let mut bytes = patch(patch(bytes[..bytes.len() - 8].to_vec(), "<f4", "<i2"), "(2,)", "(4,)");
        bytes.extend_from_slice(&[1, 0, 0xff, 0xff, 0, 0x80, 0xff, 0x7f]);
        assert_eq!(parse(&bytes).unwrap().data, vec![1., -1., -32768., 32767.]);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let good = encode_f32(&[2, 2], &[1., 2., 3., 4.]);
        let err = |b: &[u8]| parse(b).unwrap_err();
        assert!(err(b"PK\x03\x04 not numpy").contains("not a NumPy"));
        assert!(err(&good[..good.len() - 3]).contains("truncated"));
        assert!(err(&good[..12]).contains("truncated"));
        let mut long = good.clone();
        long.push(0);
        assert!(err(&long).contains("trailing"));
        let big_endian = patch(good.clone(), "<f4", ">f4");
        assert!(err(&big_endian).contains("unsupported dtype"));
        // Found by the fuzzer: a descr that is empty or starts with a multi-byte character.
        assert!(err(&patch(good.clone(), "'<f4'", "'\u{e9} '")).contains("unsupported dtype"));
        assert!(err(&patch(good.clone(), "'<f4'", "''   ")).contains("unsupported dtype"));
    }
}
