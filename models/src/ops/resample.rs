//! Resampling on the axes of a tensor: PyTorch's linear interpolation (`F.interpolate` with
//! `mode="linear"/"trilinear"`) and max pooling with kernel equal to stride.
//!
//! Linear interpolation is separable, so each axis is a matrix product with a fixed
//! `(n_out, n_in)` weight matrix: differentiable, on every backend, and exact to rounding.

use candle_core::{D, DType, Device, Result, Tensor, bail};

/// The `(n_out, n_in)` weights of PyTorch's 1D linear interpolation from `n_in` to `n_out`
/// samples, row-major.
///
/// `align_corners = false`: source `(o + 0.5) * n_in / n_out - 0.5`, clamped below at 0 (PyTorch
/// uses `1 / scale_factor` when one is given; for the integer and half factors used here the two
/// agree). `align_corners = true`: source `o * (n_in - 1) / (n_out - 1)`.
pub fn linear_weights(n_in: usize, n_out: usize, align_corners: bool) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    for o in 0..n_out {
        let src = if align_corners {
            if n_out > 1 { o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64 } else { 0.0 }
        } else {
            ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let frac = src - i0 as f64;
        m[o * n_in + i0] += 1.0 - frac;
        m[o * n_in + i1] += frac;
    }
    m
}

/// `linear_weights` as a tensor of `dtype` on `device`.
pub fn linear_matrix(n_in: usize, n_out: usize, align_corners: bool, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(linear_weights(n_in, n_out, align_corners), (n_out, n_in), device)?.to_dtype(dtype)
}

/// Apply `matrix (n_out, n_in)` along `axis` of `x`.
pub fn apply_along(x: &Tensor, axis: usize, matrix: &Tensor) -> Result<Tensor> {
    let last = x.rank() - 1;
    let (n_out, n_in) = matrix.dims2()?;
    if x.dim(axis)? != n_in {
        bail!("resample: axis {axis} of {:?} has {} samples, the matrix expects {n_in}", x.dims(), x.dim(axis)?);
    }
    let moved = if axis == last { x.clone() } else { x.transpose(axis, last)? };
    let mut dims = moved.dims().to_vec();
    let rows = moved.elem_count() / n_in;
    let y = moved.contiguous()?.reshape((rows, n_in))?.matmul(&matrix.t()?)?;
    dims[last] = n_out;
    let y = y.reshape(dims)?;
    if axis == last { Ok(y) } else { y.transpose(axis, last)?.contiguous() }
}

/// Linear interpolation of the trailing axes of `x` to `size` (one entry per trailing axis):
/// `F.interpolate(x, size, mode="trilinear" | "bilinear" | "linear", align_corners)`.
pub fn interpolate_linear(x: &Tensor, size: &[usize], align_corners: bool) -> Result<Tensor> {
    let first = x.rank().checked_sub(size.len()).filter(|&f| f >= 1);
    let Some(first) = first else {
        bail!("interpolate: {} output sizes for a tensor of rank {}", size.len(), x.rank());
    };
    let mut y = x.clone();
    for (i, &n_out) in size.iter().enumerate() {
        let axis = first + i;
        let n_in = y.dim(axis)?;
        if n_in == 0 || n_out == 0 {
            bail!("interpolate: empty axis {axis} ({n_in} -> {n_out})");
        }
        if n_in != n_out {
            let m = linear_matrix(n_in, n_out, align_corners, y.dtype(), y.device())?;
            y = apply_along(&y, axis, &m)?;
        }
    }
    Ok(y)
}

/// `nn.MaxPool3d(k)` with stride `k` on `(B, C, D, H, W)`; `k = 1` is the identity. The sizes
/// must be multiples of `k` (the teacher's are by construction).
pub fn max_pool3d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
    if k == 1 {
        return Ok(x.clone());
    }
    if k == 0 || d % k != 0 || h % k != 0 || w % k != 0 {
        bail!("max_pool3d: size {:?} is not a multiple of the kernel {k}", (d, h, w));
    }
    x.reshape(vec![b, c, d / k, k, h / k, k, w / k, k])?
        .permute(vec![0, 1, 2, 4, 6, 3, 5, 7])?
        .reshape((b, c, d / k, h / k, w / k, k * k * k))?
        .max(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_match_pytorch_by_hand() {
        // x4 without corners: source (o + 0.5) / 4 - 0.5; o = 0, 1 clamp to 0; o = 2 -> 0.125.
        let m = linear_weights(2, 8, false);
        assert_eq!(&m[0..2], &[1.0, 0.0]);
        assert_eq!(&m[2..4], &[1.0, 0.0]);
        assert_eq!(&m[4..6], &[0.875, 0.125]);
        assert_eq!(&m[14..16], &[0.0, 1.0]);
        // x0.5 without corners is the mean of pairs.
        assert_eq!(linear_weights(4, 2, false), vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
        // With corners the end points map to the end points.
        let m = linear_weights(3, 5, true);
        assert_eq!(&m[0..3], &[1.0, 0.0, 0.0]);
        assert_eq!(&m[3..6], &[0.5, 0.5, 0.0]);
        assert_eq!(&m[12..15], &[0.0, 0.0, 1.0]);
        // Rows sum to one.
        for (n_in, n_out, align) in [(7, 13, false), (13, 7, false), (31, 7, false), (2, 2, true)] {
            for row in linear_weights(n_in, n_out, align).chunks(n_in) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn max_pool_takes_block_maxima() -> Result<()> {
        let x = Tensor::arange(0f32, 64., &Device::Cpu)?.reshape((1, 1, 4, 4, 4))?;
        let y = max_pool3d(&x, 2)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![21., 23., 29., 31., 53., 55., 61., 63.]);
        Ok(())
    }
}
