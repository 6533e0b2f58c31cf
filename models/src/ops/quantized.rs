//! int8 weights: matrices stored as Candle's Q8_0 blocks (32 int8 values and one f16 scale per
//! block along a row), multiplied with Candle's quantized matrix product, which quantizes the
//! activations to Q8_0 and computes integer dot products. Rows shorter than a multiple of 32 are
//! zero-padded, in the weights when quantized and in the activations when multiplied.
//!
//! Layers load a [`Weight`]: dense (any float dtype, computed in the model's dtype) or int8. A
//! quantized weight `X.weight` is stored as the raw block bytes under `X.weight.q8_0`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 int8 values.
pub const Q8_BLOCK_BYTES: usize = 34;
/// Suffix of the stored tensor holding a weight's Q8_0 blocks.
pub const Q8_SUFFIX: &str = "q8_0";

/// A `(rows, cols)` weight matrix in Q8_0, its columns padded to a multiple of 32.
#[derive(Debug)]
pub struct Q8Matrix {
    matmul: QMatMul,
    rows: usize,
    cols: usize,
    padded_cols: usize,
}

/// Columns rounded up to whole Q8_0 blocks.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(Q8_BLOCK) * Q8_BLOCK
}

impl Q8Matrix {
    /// Quantizes a 2D weight; returns the matrix and its block bytes for storage.
    pub fn quantize(w: &Tensor) -> Result<(Q8Matrix, Vec<u8>)> {
        let (rows, cols) = w.dims2()?;
        let padded = padded_cols(cols);
        let w = w.to_dtype(DType::F32)?;
        let w = if padded > cols { w.pad_with_zeros(1, 0, padded - cols)? } else { w };
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let bytes = q.data()?.into_owned();
        Ok((Q8Matrix { matmul: QMatMul::from_qtensor(q)?, rows, cols, padded_cols: padded }, bytes))
    }

    /// Rebuilds a matrix from its stored block bytes.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize, device: &Device) -> Result<Q8Matrix> {
        let padded = padded_cols(cols);
        let expected = rows * padded / Q8_BLOCK * Q8_BLOCK_BYTES;
        if bytes.len() != expected {
            bail!("Q8_0 weight of {rows}x{cols} needs {expected} bytes, found {}", bytes.len());
        }
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), device, GgmlDType::Q8_0)?;
        let q = QTensor::new(storage, (rows, padded))?;
        Ok(Q8Matrix { matmul: QMatMul::from_qtensor(q)?, rows, cols, padded_cols: padded })
    }

    /// `x (n, cols)` times the transposed weight: `(n, rows)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, cols) = x.dims2()?;
        if cols != self.cols {
            bail!("int8 matmul: input has {cols} columns, the weight {}", self.cols);
        }
        let x = x.to_dtype(DType::F32)?;
        let x =
            if self.padded_cols > cols { x.pad_with_zeros(1, 0, self.padded_cols - cols)? } else { x.contiguous()? };
        self.matmul.forward(&x)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A layer's weight as loaded.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    /// int8; the original shape is `(rows, ...)` flattened to `(rows, cols)`.
    Q8(Arc<Q8Matrix>),
}

impl Weight {
    /// `name` from `vb` with `shape`: its Q8_0 blocks when `name.q8_0` is stored, else dense.
    pub fn load(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Weight> {
        let q_name = format!("{name}.{Q8_SUFFIX}");
        if vb.contains_tensor(&q_name) {
            let raw = vb.get_unchecked_dtype(&q_name, DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
            let rows = shape[0];
            let cols = shape[1..].iter().product();
            let m = Q8Matrix::from_bytes(&raw, rows, cols, vb.device())
                .map_err(|e| candle_core::Error::Msg(format!("{}.{q_name}: {e}", vb.prefix())))?;
            Ok(Weight::Q8(Arc::new(m)))
        } else {
            Ok(Weight::Dense(vb.get(shape, name)?))
        }
    }
}

/// A linear layer (`nn.Linear`) whose weight may be int8. Takes `(n, in)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = Weight::load(&vb, "weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Q8(q) => q.forward(x)?.to_dtype(x.dtype())?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
