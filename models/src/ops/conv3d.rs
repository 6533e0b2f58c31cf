//! 3D convolution (cross-correlation with zero padding), as `torch.nn.functional.conv3d` with
//! dilation 1 and groups 1.
//!
//! Three formulations, chosen by shape, all built from differentiable Candle ops:
//! - 1x1x1 kernels: a matrix product over channels;
//! - kernel equal to stride without padding (the patch embedding): a reshape into patches and a
//!   matrix product;
//! - stride 1 (the 3x3x3 padding-1 convolutions): on the CPU a custom op with its own backward
//!   pass ([`super::conv3d_cpu`]): in f32 on AVX-512 CPUs a direct kernel
//!   ([`super::conv3d_avx512`]), otherwise line buffers + gemm; on other devices and dtypes a sum over the
//!   kernel's depth taps of Candle's `conv2d` on depth slices folded into the batch, which runs on
//!   every backend and has a backward pass.
//!
//! At inference a UnetResBlock's convolutions go through [`conv3d_with_moments`] (the direct kernel
//! with the instance norms fused), in f32 or, for int8 models on AVX-512 VNNI, in 16-bit integers
//! ([`super::conv3d_int16`], [`ConvArithmetic`]).

use candle_core::{DType, Result, Tensor, bail};

use super::conv3d_cpu::Conv3dCpu;
use super::conv3d_int8::{self, Conv3dQ8};
use super::quantized::{Q8Matrix, Weight};

/// `conv3d(x, w, bias, padding, stride)`: `x (B, Cin, D, H, W)`, `w (Cout, Cin, kd, kh, kw)`,
/// `bias (Cout)`; the same `padding` and `stride` on every axis.
pub fn conv3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, c_in, _, _, _) = x.dims5()?;
    let (c_out, w_in, kd, kh, kw) = w.dims5()?;
    if w_in != c_in {
        bail!("conv3d: input has {c_in} channels but the weight {:?} expects {w_in}", w.dims());
    }
    if stride == 0 {
        bail!("conv3d: stride must be positive");
    }
    let y = if (kd, kh, kw) == (1, 1, 1) && padding == 0 && stride == 1 {
        pointwise(x, w)?
    } else if (kd, kh, kw) == (stride, stride, stride) && padding == 0 {
        patchify(x, w, stride)?
    } else if stride == 1 {
        let cpu_kernel = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype();
        let tracked = x.track_op() || w.track_op();
        // The kernel's backward pass needs a cubic kernel larger than the padding.
        let has_backward = kd == kh && kh == kw && padding < kd;
        if cpu_kernel && !tracked {
            x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Conv3dCpu { padding })?
        } else if cpu_kernel && has_backward {
            x.contiguous()?.apply_op2(&w.contiguous()?, Conv3dCpu { padding })?
        } else {
            depth_taps(x, w, padding)?
        }
    } else {
        bail!("conv3d: kernel {:?} with stride {stride} and padding {padding} is not supported", (kd, kh, kw));
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1, 1))?),
        None => Ok(y),
    }
}

/// 1x1x1 convolution: `(Cout, Cin) x (B, Cin, N)`.
fn pointwise(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c_in, d, h, wd) = x.dims5()?;
    let c_out = w.dim(0)?;
    let w = w.reshape((c_out, c_in))?;
    let x = x.reshape((b, c_in, d * h * wd))?;
    w.broadcast_matmul(&x)?.reshape((b, c_out, d, h, wd))
}

/// Kernel == stride, no padding: non-overlapping patches, each a row of a matrix product.
fn patchify(x: &Tensor, w: &Tensor, s: usize) -> Result<Tensor> {
    let (b, c_in, d, h, wd) = x.dims5()?;
    let c_out = w.dim(0)?;
    if d % s != 0 || h % s != 0 || wd % s != 0 {
        bail!("conv3d: spatial size {:?} is not divisible by the stride {s}", (d, h, wd));
    }
    let (od, oh, ow) = (d / s, h / s, wd / s);
    let patches = x
        .reshape(vec![b, c_in, od, s, oh, s, ow, s])?
        .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
        .reshape((b * od * oh * ow, c_in * s * s * s))?;
    let w = w.reshape((c_out, c_in * s * s * s))?;
    patches.matmul(&w.t()?)?.reshape((b, od, oh, ow, c_out))?.permute((0, 4, 1, 2, 3))?.contiguous()
}

/// Stride-1 convolution as a sum over depth taps of 2D convolutions on depth slices.
fn depth_taps(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (b, c_in, d, h, wd) = x.dims5()?;
    let (c_out, _, kd, kh, kw) = w.dims5()?;
    let d_pad = d + 2 * padding;
    if d_pad < kd || h + 2 * padding < kh || wd + 2 * padding < kw {
        bail!("conv3d: kernel {:?} is larger than the padded input {:?}", (kd, kh, kw), x.dims());
    }
    let d_out = d_pad - kd + 1;
    // (B, Dp, Cin, H, W): a depth slice is then a batch of 2D images.
    let slices = x.pad_with_zeros(2, padding, padding)?.permute((0, 2, 1, 3, 4))?.contiguous()?;
    let mut sum: Option<Tensor> = None;
    for tap in 0..kd {
        let slab = slices.narrow(1, tap, d_out)?.reshape((b * d_out, c_in, h, wd))?;
        let kernel = w.narrow(2, tap, 1)?.squeeze(2)?.contiguous()?;
        let y = slab.conv2d(&kernel, padding, 1, 1, 1)?;
        sum = Some(match sum {
            Some(acc) => (acc + y)?,
            None => y,
        });
    }
    let y = sum.expect("kernel depth is at least one");
    let (_, _, h_out, w_out) = y.dims4()?;
    y.reshape((b, d_out, c_out, h_out, w_out))?.permute((0, 2, 1, 3, 4))?.contiguous()
}

/// Depthwise 3D convolution (`groups = channels`, stride 1), as the teacher's adapters use it:
/// `x (B, C, D, H, W)`, `w (C, 1, kd, kh, kw)`, `bias (C)`. A sum over the kernel taps of shifted,
/// per-channel scaled views, so it is differentiable on every backend.
pub fn depthwise_conv3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let (_, c, d, h, wd) = x.dims5()?;
    let (w_c, per_group, kd, kh, kw) = w.dims5()?;
    if w_c != c || per_group != 1 {
        bail!("depthwise_conv3d: input has {c} channels but the weight is {:?}", w.dims());
    }
    let p = padding;
    if d + 2 * p < kd || h + 2 * p < kh || wd + 2 * p < kw {
        bail!("depthwise_conv3d: kernel {:?} is larger than the padded input {:?}", (kd, kh, kw), x.dims());
    }
    let (od, oh, ow) = (d + 2 * p + 1 - kd, h + 2 * p + 1 - kh, wd + 2 * p + 1 - kw);
    let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?.pad_with_zeros(4, p, p)?;
    let taps = w.reshape((c, kd * kh * kw))?;
    let mut sum: Option<Tensor> = None;
    for a in 0..kd {
        for b in 0..kh {
            for e in 0..kw {
                let view = padded.narrow(2, a, od)?.narrow(3, b, oh)?.narrow(4, e, ow)?;
                let scale = taps.narrow(1, (a * kh + b) * kw + e, 1)?.reshape((1, c, 1, 1, 1))?;
                let term = view.broadcast_mul(&scale)?;
                sum = Some(match sum {
                    Some(acc) => (acc + term)?,
                    None => term,
                });
            }
        }
    }
    let y = sum.expect("a kernel has at least one tap");
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, c, 1, 1, 1))?),
        None => Ok(y),
    }
}

/// `(mean, variance)` of each `(sample, channel)` plane of a volume.
pub type PlaneMoments = Vec<(f64, f64)>;

/// An instance norm + LeakyReLU not yet applied to a convolution's input: the input's plane
/// moments, the norm's epsilon and the slope.
pub struct PendingNorm<'a> {
    pub moments: &'a [(f64, f64)],
    pub eps: f64,
    pub slope: f64,
}

/// The arithmetic of the conv blocks' 3x3x3 convolutions at inference on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvArithmetic {
    /// f32 multiply-adds: what MONAI computes, to rounding.
    #[default]
    Float,
    /// Activations and weights rounded to 16-bit integers and summed exactly in 32 bits, where the
    /// CPU has AVX-512 VNNI (twice f32's multiply-adds per instruction; see
    /// `ops/conv3d_int16.rs`), f32 elsewhere: what int8 models run.
    Int16,
}

/// A stride-1 convolution at inference that also returns its output's `(mean, variance)` per
/// `(sample, channel)` and can apply the instance norm and LeakyReLU of the previous layer to its
/// input as it reads it (`input_norm`): a UnetResBlock's activations then make one trip through
/// memory instead of three. `kernel` is the weight's spatial size, as for [`conv3d_weight`]; an
/// int8 weight is widened once and kept, as there. `arithmetic` chooses f32 or 16-bit integer
/// products. `None` where the direct AVX-512 kernel does not serve the call (another CPU, device
/// or dtype, gradients recorded, output channels in neither 12s nor 8s); the caller takes the
/// plain ops.
pub fn conv3d_with_moments(
    x: &Tensor,
    w: &Weight,
    kernel: [usize; 3],
    padding: usize,
    input_norm: Option<PendingNorm>,
    arithmetic: ConvArithmetic,
) -> Result<Option<(Tensor, PlaneMoments)>> {
    let c_out = match w {
        Weight::Dense(w) => w.dim(0)?,
        Weight::Q8(q) => q.rows(),
    };
    // An int8 weight widens to f32; a dense one must be f32 and outside any gradient graph.
    let weight_f32 = match w {
        Weight::Dense(w) => w.dtype() == DType::F32 && !w.track_op(),
        Weight::Q8(_) => true,
    };
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() && weight_f32 && direct_f32_serves(c_out)) {
        return Ok(None);
    }
    #[cfg(target_arch = "x86_64")]
    {
        use candle_core::{CpuStorage, Storage};
        let w = match w {
            Weight::Dense(w) => w.contiguous()?,
            Weight::Q8(q) => widened_conv_weight(q, kernel)?,
        };
        let x = x.contiguous()?;
        let (b, g) = super::conv3d_cpu::Geometry::of(x.dims(), w.dims(), padding)?;
        if input_norm.as_ref().is_some_and(|n| n.moments.len() != b * g.c_in) {
            bail!("conv3d_with_moments: the pending norm's moments do not cover the input's {b} x {} planes", g.c_in);
        }
        let stats: Option<Vec<(f64, f64)>> = input_norm
            .as_ref()
            .map(|n| n.moments.iter().map(|&(mean, var)| (mean, 1.0 / (var + n.eps).sqrt())).collect());
        let norm = stats
            .as_deref()
            .zip(input_norm.as_ref())
            .map(|(stats, n)| super::conv3d_avx512::InputNorm { stats, slope: n.slope });
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) = (&*xs, &*ws) else {
            return Ok(None);
        };
        let (x0, x1) = super::contiguous_range(xl, "conv3d_with_moments")?;
        let (w0, w1) = super::contiguous_range(wl, "conv3d_with_moments")?;
        let (xv, wv) = (&xv[x0..x1], &wv[w0..w1]);
        let int16 = (arithmetic == ConvArithmetic::Int16 && super::conv3d_int16::available())
            .then(|| super::conv3d_int16::conv(xv, wv, b, g, norm.as_ref(), true))
            .flatten();
        let Some((y, Some(moments))) = int16.or_else(|| super::conv3d_avx512::conv(xv, wv, b, g, norm.as_ref(), true))
        else {
            return Ok(None);
        };
        let y = Tensor::from_vec(y, (b, g.c_out, g.out[0], g.out[1], g.out[2]), x.device())?;
        Ok(Some((y, moments)))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // `direct_f32_serves` is false here: the early return was taken.
        let _ = (kernel, padding, input_norm, arithmetic);
        Ok(None)
    }
}

/// Whether [`ConvArithmetic::Int16`] computes in 16-bit integers on this CPU (AVX-512 VNNI); it
/// falls back to f32 elsewhere.
pub fn int16_convolutions_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::conv3d_int16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the f32 direct AVX-512 convolution kernel serves convolutions with `c_out` outputs.
fn direct_f32_serves(c_out: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::conv3d_avx512::available() && (c_out.is_multiple_of(12) || c_out.is_multiple_of(8))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = c_out;
        false
    }
}

/// The taps of a `kernel` that an int8 convolution matrix's columns hold whole, or an error.
fn int8_kernel_taps(q: &Q8Matrix, kernel: [usize; 3]) -> Result<usize> {
    let taps: usize = kernel.iter().product();
    if taps == 0 || !q.cols().is_multiple_of(taps) {
        bail!("int8 conv3d: {} weight columns do not hold {kernel:?} kernels", q.cols());
    }
    Ok(taps)
}

/// An int8 convolution weight widened to f32, `(out, in, kd, kh, kw)`: made once, kept in the matrix.
fn widened_conv_weight(q: &Q8Matrix, kernel: [usize; 3]) -> Result<Tensor> {
    let taps = int8_kernel_taps(q, kernel)?;
    q.widened()?.reshape((q.rows(), q.cols() / taps, kernel[0], kernel[1], kernel[2]))
}

/// [`conv3d`] with a weight that may be int8 (see [`super::quantized`]): `kernel` is the weight's
/// spatial size, which an int8 matrix no longer carries.
///
/// An int8 weight on a CPU whose f32 direct kernel serves its channel count is widened once (kept
/// in the matrix) and run weight-only by that kernel: on the development machine (Zen 4) it is
/// faster than the int8 x int8 VNNI kernel (77 vs 116 ms for 24 -> 12 channels at 96^3) and
/// exact in its activations. Other channel counts on CPUs with AVX-512 VNNI take the int8 x int8
/// kernel ([`super::conv3d_int8`]). Elsewhere int8 convolutions are weight-only: the weight is
/// widened to the input's dtype on each call (a few hundred thousand values at most, next to
/// millions of activations) and computed by the float kernel; with AVX2 alone, a Q8_0 block dot
/// product per voxel was three times slower than the f32 tiled gemm.
pub fn conv3d_weight(
    x: &Tensor,
    w: &Weight,
    kernel: [usize; 3],
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    match w {
        Weight::Dense(w) => conv3d(x, w, bias, padding, 1),
        Weight::Q8(q) => {
            let taps = int8_kernel_taps(q, kernel)?;
            let int8_kernel = x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() && taps > 1;
            if int8_kernel && direct_f32_serves(q.rows()) {
                return conv3d(x, &widened_conv_weight(q, kernel)?, bias, padding, 1);
            }
            if int8_kernel && conv3d_int8::available() {
                let op = Conv3dQ8 { weight: q.clone(), kernel, padding };
                let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
                return match bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, q.rows(), 1, 1, 1))?),
                    None => Ok(y),
                };
            }
            let shape = (q.rows(), q.cols() / taps, kernel[0], kernel[1], kernel[2]);
            let w = Tensor::from_vec(q.dequantize(), shape, x.device())?.to_dtype(x.dtype())?;
            conv3d(x, &w, bias, padding, 1)
        }
    }
}
