//! int8 weights: matrices stored as Candle's Q8_0 blocks (32 int8 values and one f16 scale per
//! block along a row). Products quantize each activation row to Q8_0 too and use Candle's
//! integer block dot product (AVX2/NEON), one row per task in parallel; on AVX-512 CPUs linear
//! layers run weight-only in f32 instead (see `weight_only_linears`). Rows shorter than a multiple of 32 are
//! zero-padded, in the weights when quantized and in the activations when multiplied.
//!
//! Layers load a [`Weight`]: dense (any float dtype, computed in the model's dtype) or int8. A
//! quantized weight `X.weight` is stored as the raw block bytes under `X.weight.q8_0`.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv3d_int8::PackedQ8;

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 int8 values.
pub const Q8_BLOCK_BYTES: usize = 34;
/// Suffix of the stored tensor holding a weight's Q8_0 blocks.
pub const Q8_SUFFIX: &str = "q8_0";

/// A `(rows, cols)` weight matrix in Q8_0, its columns padded to a multiple of 32.
#[derive(Debug)]
pub struct Q8Matrix {
    /// Row-major blocks, `padded_cols / 32` per row.
    blocks: Vec<BlockQ8_0>,
    rows: usize,
    cols: usize,
    padded_cols: usize,
    /// The layout of the int8 convolution kernel, made on its first use.
    conv_pack: OnceLock<PackedQ8>,
    /// The matrix widened to f32 `(rows, cols)`, made on first use by the convolutions that run
    /// weight-only in the f32 direct kernel.
    widened: OnceLock<Tensor>,
}

/// A block's scale and values (Candle keeps the fields to itself).
pub(crate) fn block_parts(block: &BlockQ8_0) -> (f32, [i8; Q8_BLOCK]) {
    let mut values = [0i8; Q8_BLOCK];
    // SAFETY: BlockQ8_0 is repr(C) { d: f16, qs: [i8; 32] }, 34 bytes without padding (Candle
    // asserts the size), so the scale is its first two bytes and the values the next 32.
    let scale = unsafe {
        let p = block as *const BlockQ8_0 as *const u8;
        std::ptr::copy_nonoverlapping(p.add(2) as *const i8, values.as_mut_ptr(), Q8_BLOCK);
        half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)]))
    };
    (scale.to_f32(), values)
}

/// Quantizes `xs` (a multiple of 32 values) into Q8_0 blocks as GGML does (scale = max|x| / 127,
/// values rounded to the nearest integer), with a rounding that vectorizes: Candle's scalar
/// `from_float` calls `roundf` per value and dominated the int8 convolution's time. Ties round to
/// even rather than away from zero, which changes nothing measurable.
pub fn quantize_row_q8_0(xs: &[f32], blocks: &mut [BlockQ8_0]) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    for (chunk, block) in xs.chunks_exact(Q8_BLOCK).zip(blocks.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; Q8_BLOCK];
        for (qv, &v) in q.iter_mut().zip(chunk) {
            *qv = ((v * id + MAGIC) - MAGIC) as i8;
        }
        let scale = half::f16::from_f32(d).to_bits().to_le_bytes();
        // SAFETY: BlockQ8_0 is repr(C) { d: f16, qs: [i8; 32] }, 34 bytes without padding (Candle
        // asserts the size); writing the scale bytes then the 32 values fills it completely.
        unsafe {
            let p = block as *mut BlockQ8_0 as *mut u8;
            std::ptr::copy_nonoverlapping(scale.as_ptr(), p, 2);
            std::ptr::copy_nonoverlapping(q.as_ptr() as *const u8, p.add(2), Q8_BLOCK);
        }
    }
}

/// Reads stored Q8_0 bytes as blocks.
fn blocks_from_bytes(bytes: &[u8]) -> Vec<BlockQ8_0> {
    assert_eq!(std::mem::size_of::<BlockQ8_0>(), Q8_BLOCK_BYTES);
    let n = bytes.len() / Q8_BLOCK_BYTES;
    let mut blocks = vec![BlockQ8_0::zeros(); n];
    // SAFETY: BlockQ8_0 is repr(C) with an f16 scale and 32 i8 (34 bytes, no padding), the layout
    // of the stored bytes, and any bit pattern is a valid value of those fields.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, n * Q8_BLOCK_BYTES) };
    blocks
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
        let blocks = blocks_from_bytes(&bytes);
        Ok((
            Q8Matrix { blocks, rows, cols, padded_cols: padded, conv_pack: OnceLock::new(), widened: OnceLock::new() },
            bytes,
        ))
    }

    /// Rebuilds a matrix from its stored block bytes.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize, device: &Device) -> Result<Q8Matrix> {
        let padded = padded_cols(cols);
        let expected = rows * padded / Q8_BLOCK * Q8_BLOCK_BYTES;
        if bytes.len() != expected {
            bail!("Q8_0 weight of {rows}x{cols} needs {expected} bytes, found {}", bytes.len());
        }
        if !device.is_cpu() {
            bail!("int8 matrices compute on the CPU; on other devices load them with Weight::load, which widens them");
        }
        Ok(Q8Matrix {
            blocks: blocks_from_bytes(bytes),
            rows,
            cols,
            padded_cols: padded,
            conv_pack: OnceLock::new(),
            widened: OnceLock::new(),
        })
    }

    /// The matrix in f32, `(rows, cols)` row-major, without the padding: what GPUs compute with.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut padded_row = vec![0f32; self.padded_cols];
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            BlockQ8_0::to_float(self.row_blocks(r), &mut padded_row);
            out.extend_from_slice(&padded_row[..self.cols]);
        }
        out
    }

    /// [`Self::dequantize`] as an f32 CPU tensor `(rows, cols)`, made once and kept.
    pub fn widened(&self) -> Result<Tensor> {
        if let Some(t) = self.widened.get() {
            return Ok(t.clone());
        }
        let t = Tensor::from_vec(self.dequantize(), (self.rows, self.cols), &Device::Cpu)?;
        Ok(self.widened.get_or_init(|| t).clone())
    }

    /// `x (n, cols)` times the transposed weight: `(n, rows)`. Each input row is quantized to
    /// Q8_0 and dotted with every weight row in integer arithmetic; rows run in parallel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            bail!("int8 matmul: input has {cols} columns, the weight {}", self.cols);
        }
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * self.rows];
        out.par_chunks_mut(self.rows).zip(data.par_chunks(cols)).for_each_init(
            || (vec![0f32; self.padded_cols], vec![BlockQ8_0::zeros(); self.padded_cols / Q8_BLOCK]),
            |(row, blocks), (dst, src)| {
                row[..cols].copy_from_slice(src);
                self.dot_rows(row, blocks, dst);
            },
        );
        Tensor::from_vec(out, (n, self.rows), x.device())
    }

    /// Quantizes one zero-padded input row (`padded_cols` values) into `blocks` and writes its dot
    /// product with every weight row into `out`.
    pub fn dot_rows(&self, row: &[f32], blocks: &mut [BlockQ8_0], out: &mut [f32]) {
        quantize_row_q8_0(row, blocks);
        for (r, o) in out.iter_mut().enumerate() {
            *o = BlockQ8_0::vec_dot(self.padded_cols, self.row_blocks(r), blocks);
        }
    }

    /// The Q8_0 blocks of row `r`.
    pub fn row_blocks(&self, r: usize) -> &[BlockQ8_0] {
        let per_row = self.padded_cols / Q8_BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    /// The weight in the int8 convolution kernel's layout.
    pub(crate) fn conv_pack(&self) -> &PackedQ8 {
        self.conv_pack.get_or_init(|| PackedQ8::new(self))
    }

    pub fn padded_cols(&self) -> usize {
        self.padded_cols
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
            let m = Q8Matrix::from_bytes(&raw, rows, cols, &Device::Cpu)
                .map_err(|e| candle_core::Error::Msg(format!("{}.{q_name}: {e}", vb.prefix())))?;
            if vb.device().is_cpu() {
                Ok(Weight::Q8(Arc::new(m)))
            } else {
                // CUDA and Metal have no Q8_0 kernels of prosam's: the weight computes densely there,
                // in the model's dtype, from the same int8 values.
                let dense = Tensor::from_vec(m.dequantize(), shape, &Device::Cpu)?;
                Ok(Weight::Dense(dense.to_dtype(vb.dtype())?.to_device(vb.device())?))
            }
        } else {
            Ok(Weight::Dense(vb.get(shape, name)?))
        }
    }
}

/// Whether an int8 linear layer runs weight-only: its matrix widened to f32 once (kept in the
/// [`Q8Matrix`]) and multiplied by Candle's f32 gemm. On AVX-512 CPUs that beats the Q8_0 block dot
/// products (Candle's are AVX2), as the direct f32 convolution kernel beats the int8 one: the fs 12
/// student's Swin stages 3 and 4 took 27-31 and 12 ms instead of 36-49 and 18-21.
fn weight_only_linears(x: &Tensor) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() && super::conv3d_avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = x;
        false
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
            Weight::Q8(q) if weight_only_linears(x) => x.matmul(&q.widened()?.t()?)?,
            Weight::Q8(q) => q.forward(x)?.to_dtype(x.dtype())?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
