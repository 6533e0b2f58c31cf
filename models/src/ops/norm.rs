//! Normalisations: instance norm over the spatial axes of a channels-first volume, and layer norm
//! over the channels of a channels-last tensor, both with PyTorch's biased variance.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

/// `nn.InstanceNorm3d` with its defaults (no affine, no running statistics): each (sample,
/// channel) of `x (B, C, D, H, W)` is normalised over D*H*W.
///
/// Mean and variance are accumulated in f64: a 96^3 volume sums close to a million values, and
/// f32 accumulation would move the result by more than the 1e-4 that MONAI parity allows.
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
    if x.device().is_cpu() && !x.track_op() && matches!(x.dtype(), DType::F32 | DType::F64) {
        // Inference: one pass for the statistics, one to normalise, per plane in parallel,
        // instead of the eight tensor passes below.
        return x.contiguous()?.apply_op1_no_bwd(&InstanceNormCpu { eps });
    }
    let flat = x.reshape((b, c, d * h * w))?;
    // f64 statistics where the device has f64 (Metal does not; GPUs reduce in trees, which keeps
    // f32 sums accurate enough), never the half types.
    let stats = if x.device().is_cpu() || x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let wide = flat.to_dtype(stats)?;
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
    if matches!(x.dtype(), DType::F16 | DType::BF16) {
        // Statistics in f32, as PyTorch's autocast keeps layer norm, then back to the half type.
        let wide = affine.map(|(w, b)| -> Result<_> { Ok((w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)) });
        let wide = wide.transpose()?;
        let y = channel_layer_norm(&x.to_dtype(DType::F32)?, wide.as_ref().map(|(w, b)| (w, b)), eps)?;
        return y.to_dtype(x.dtype());
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    match affine {
        Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
        None => Ok(y),
    }
}

/// Forward-only CPU instance norm: each `(sample, channel)` plane in parallel, statistics in f64.
struct InstanceNormCpu {
    eps: f64,
}

fn instance_norm_planes<T: WithDType>(x: &[T], plane: usize, eps: f64) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(plane).zip(x.par_chunks(plane)).for_each(|(dst, src)| {
        let n = src.len() as f64;
        let mean = src.iter().map(|v| v.to_f64()).sum::<f64>() / n;
        let var = src.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for (o, v) in dst.iter_mut().zip(src) {
            *o = T::from_f64((v.to_f64() - mean) * inv_std);
        }
    });
    y
}

impl CustomOp1 for InstanceNormCpu {
    fn name(&self) -> &'static str {
        "prosam-instance-norm-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("prosam-instance-norm-cpu: the input must be contiguous");
        };
        let plane: usize = layout.dims().iter().skip(2).product();
        if plane == 0 {
            bail!("prosam-instance-norm-cpu: empty spatial extent");
        }
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(instance_norm_planes(&x[start..end], plane, self.eps)),
            CpuStorage::F64(x) => CpuStorage::F64(instance_norm_planes(&x[start..end], plane, self.eps)),
            _ => bail!("prosam-instance-norm-cpu: only f32 and f64"),
        };
        Ok((out, layout.shape().clone()))
    }
}
