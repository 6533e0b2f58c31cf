//! Normalisations: instance norm over the spatial axes of a channels-first volume, and layer norm
//! over the channels of a channels-last tensor, both with PyTorch's biased variance.

use candle_core::{D, DType, Result, Tensor};

/// `nn.InstanceNorm3d` with its defaults (no affine, no running statistics): each (sample,
/// channel) of `x (B, C, D, H, W)` is normalised over D*H*W.
///
/// Mean and variance are accumulated in f64: a 96^3 volume sums close to a million values, and
/// f32 accumulation would move the result by more than the 1e-4 that MONAI parity allows.
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
    let flat = x.reshape((b, c, d * h * w))?;
    let wide = flat.to_dtype(DType::F64)?;
    let mean = wide.mean_keepdim(D::Minus1)?;
    let centered = wide.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let y = if x.dtype() == DType::F64 {
        centered.broadcast_mul(&inv_std)?
    } else {
        let mean = mean.to_dtype(x.dtype())?;
        let inv_std = inv_std.to_dtype(x.dtype())?;
        flat.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?
    };
    y.reshape((b, c, d, h, w))
}

/// Layer norm over the last axis (`F.layer_norm(x, [C], weight, bias, eps)`); `affine` is
/// `(weight, bias)` or `None` for SwinUNETR's parameter-free `proj_out`.
///
/// Written as two passes (mean, then centred variance) rather than with Candle's fused kernel, which
/// has no backward pass and computes E[x^2] - E[x]^2 in f32, losing digits when the mean is large.
pub fn channel_layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    match affine {
        Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
        None => Ok(y),
    }
}
