//! Re-encoding a model file's weights: f16 (every tensor in half precision) or int8 (linear
//! layers and 3x3x3 convolutions as Q8_0 blocks, the rest in f16, where int8 buys nothing).

use candle_core::{DType, Tensor};

use super::{Metadata, Precision, QuantizedTensor};
use crate::ops::quantized::{Q8_SUFFIX, Q8Matrix};
use crate::{Error, Result};

/// Weights with fewer values stay in f16: they are the full-resolution convolutions next to the
/// input and output (where int8 rounding moves labels most) and the narrow first-stage linear
/// layers, and together they weigh little in the file.
pub const INT8_MIN_VALUES: usize = 8_192;

/// Whether a weight is stored and run as int8: the linear layers' matrices and the 3x3x3
/// convolution kernels (the layers that load a `quantized::Weight`) of at least
/// [`INT8_MIN_VALUES`] values.
pub fn is_int8_candidate(key: &str, shape: &[usize]) -> bool {
    let kind = shape.len() == 2 || (shape.len() == 5 && shape[2..] == [3, 3, 3]);
    key.ends_with(".weight") && kind && shape.iter().product::<usize>() >= INT8_MIN_VALUES
}

/// The tensors and metadata of `metadata`'s model re-encoded in `to`. `tensors` are the stored
/// tensors of an f32 or f16 model; quantizing an int8 model again is refused.
pub fn quantize(
    metadata: &Metadata,
    tensors: Vec<(String, Tensor)>,
    to: Precision,
) -> Result<(Metadata, Vec<(String, Tensor)>)> {
    let refuse = Error::Quantize;
    if to == Precision::Int8 && matches!(metadata.architecture, super::Architecture::AutoProSam(_)) {
        return Err(refuse("the teacher runs in f32 or f16; int8 is for the students that ship".into()));
    }
    if metadata.precision == Precision::Int8 {
        return Err(refuse("the model is already int8; quantize from its f32 or f16 file".into()));
    }
    if to == Precision::F32 && metadata.precision != Precision::F32 {
        return Err(refuse(format!(
            "converting {} back to f32 gains no accuracy; keep the original f32 file",
            metadata.precision
        )));
    }
    let mut out_meta = metadata.clone();
    out_meta.precision = to;
    out_meta.quantized.clear();
    let mut out = Vec::with_capacity(tensors.len());
    for (key, t) in tensors {
        match to {
            Precision::F32 => out.push((key, t.to_dtype(DType::F32)?)),
            Precision::F16 => out.push((key, t.to_dtype(DType::F16)?)),
            Precision::Int8 if is_int8_candidate(&key, t.dims()) => {
                let rows = t.dim(0)?;
                let (_, bytes) = Q8Matrix::quantize(&t.reshape((rows, ()))?)?;
                let n = bytes.len();
                out_meta
                    .quantized
                    .insert(key.clone(), QuantizedTensor { encoding: Q8_SUFFIX.into(), shape: t.dims().to_vec() });
                out.push((format!("{key}.{Q8_SUFFIX}"), Tensor::from_vec(bytes, n, t.device())?));
            }
            Precision::Int8 => out.push((key, t.to_dtype(DType::F16)?)),
        }
    }
    Ok((out_meta, out))
}
