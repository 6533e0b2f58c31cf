//! Normalisations: instance norm over the spatial axes of a channels-first volume, and layer norm
//! over the channels of a channels-last tensor, both with PyTorch's biased variance.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

/// `nn.InstanceNorm3d` with its defaults (no affine, no running statistics): each (sample,
/// channel) of `x (B, C, D, H, W)` is normalised over D*H*W.
///
/// Mean and variance are accumulated in f64: a 96^3 volume sums close to a million values, and
/// f32 accumulation would move the result by more than the 1e-4 that MONAI parity allows.
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    instance_norm_act(x, None, None, eps)
}

/// `act(instance_norm(x) + residual)`, the tail of MONAI's `UnetResBlock` and of the teacher's
/// convolution blocks: `residual` has `x`'s shape; `act` is LeakyReLU with `leaky_slope` in `[0, 1]`
/// (0 is ReLU), or the identity for `None`.
///
/// On the CPU this is one kernel with its own backward pass: a statistics pass and one output pass
/// per plane, where the composed form (other devices, half types) reads and writes the volume about
/// ten times forward and twenty backward.
pub fn instance_norm_act(x: &Tensor, residual: Option<&Tensor>, leaky_slope: Option<f64>, eps: f64) -> Result<Tensor> {
    if let Some(r) = residual
        && r.dims() != x.dims()
    {
        bail!("instance_norm_act: residual {:?} does not match the input {:?}", r.dims(), x.dims());
    }
    if leaky_slope.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
        bail!("instance_norm_act: the LeakyReLU slope must lie in [0, 1]");
    }
    let tracked = x.track_op() || residual.is_some_and(|r| r.track_op());
    let fusable = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && residual.is_none_or(|r| r.dtype() == x.dtype());
    if fusable {
        let op = InstanceNormCpu { eps, leaky_slope, moments: None, normalise_residual: false };
        let x = x.contiguous()?;
        return match (residual, tracked) {
            (Some(r), true) => x.apply_op2(&r.contiguous()?, op),
            (Some(r), false) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
            (None, true) => x.apply_op1(op),
            (None, false) => x.apply_op1_no_bwd(&op),
        };
    }
    let mut y = instance_norm_composed(x, eps)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    match leaky_slope {
        Some(0.0) => y.relu(),
        // max(y, slope * y) is LeakyReLU for a slope in [0, 1], in two passes.
        Some(slope) => y.maximum(&(&y * slope)?),
        None => Ok(y),
    }
}

/// [`instance_norm_act`] of an f32 CPU tensor at inference with each `(sample, channel)` plane's
/// `(mean, variance)` already known (see [`super::conv3d::conv3d_with_moments`]): one pass instead of
/// two over a volume that does not fit in the cache.
///
/// With `normalise_residual` the residual is instance-normalised first (its planes' own
/// statistics), as `instance_norm(residual)` would, without that volume being written out.
pub fn instance_norm_act_with_moments(
    x: &Tensor,
    moments: Vec<(f64, f64)>,
    residual: Option<&Tensor>,
    normalise_residual: bool,
    leaky_slope: Option<f64>,
    eps: f64,
) -> Result<Tensor> {
    if x.track_op() || residual.is_some_and(|r| r.track_op()) {
        bail!("instance_norm_act_with_moments: inference only (no gradients)");
    }
    if let Some(r) = residual
        && (r.dims() != x.dims() || r.dtype() != x.dtype())
    {
        bail!("instance_norm_act_with_moments: residual {:?} does not match the input {:?}", r.dims(), x.dims());
    }
    let op = InstanceNormCpu { eps, leaky_slope, moments: Some(moments), normalise_residual };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

/// Instance norm from differentiable Candle ops (training, GPUs, half types).
fn instance_norm_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
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
/// At inference on the CPU, one kernel does both passes per token (statistics in f64), where the
/// composed form makes nine passes over the tensor.
pub fn channel_layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    if matches!(x.dtype(), DType::F16 | DType::BF16) {
        // Statistics in f32, as PyTorch's autocast keeps layer norm, then back to the half type.
        let wide = affine.map(|(w, b)| -> Result<_> { Ok((w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)) });
        let wide = wide.transpose()?;
        let y = channel_layer_norm(&x.to_dtype(DType::F32)?, wide.as_ref().map(|(w, b)| (w, b)), eps)?;
        return y.to_dtype(x.dtype());
    }
    let tracked = x.track_op() || affine.is_some_and(|(w, b)| w.track_op() || b.track_op());
    let c = x.dim(D::Minus1)?;
    let affine_ok = affine
        .is_none_or(|(w, b)| w.dims() == [c] && b.dims() == [c] && w.dtype() == x.dtype() && b.dtype() == x.dtype());
    if x.device().is_cpu() && !tracked && matches!(x.dtype(), DType::F32 | DType::F64) && affine_ok {
        let x = x.contiguous()?;
        return match affine {
            Some((w, b)) => x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &LayerNormCpu { eps }),
            None => x.apply_op1_no_bwd(&LayerNormCpu { eps }),
        };
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

/// The CPU instance norm with the optional residual and LeakyReLU of [`instance_norm_act`]: each `(sample, channel)` plane in parallel, statistics in f64.
struct InstanceNormCpu {
    eps: f64,
    leaky_slope: Option<f64>,
    /// Each plane's `(mean, variance)` when already known (from the convolution that made it):
    /// the pass that would compute them is skipped. Inference only.
    moments: Option<Vec<(f64, f64)>>,
    /// The residual is itself instance-normalised (statistics of its own planes) before the sum:
    /// a UnetResBlock's `norm3(conv3(x))` without writing it out. Inference only.
    normalise_residual: bool,
}

/// A plane's mean and `1 / sqrt(var + eps)`, in f64, from one pass: sums of `v - k` and of its
/// square, `k` the plane's first value (the shift keeps the variance free of cancellation when
/// the mean is far from zero), in 4 lanes so that the loop vectorises. One pass instead of two
/// (mean, then squared deviations) reads each 3.5 MB plane of a 96^3 window once less.
fn plane_statistics<T: WithDType>(src: &[T], eps: f64) -> (f64, f64) {
    let Some(first) = src.first() else { return (0.0, 1.0 / eps.sqrt()) };
    let k = first.to_f64();
    let (mut sum, mut sq) = ([0f64; 4], [0f64; 4]);
    let chunks = src.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..4 {
            let d = c[l].to_f64() - k;
            sum[l] += d;
            sq[l] += d * d;
        }
    }
    let (mut s1, mut s2) = (sum.iter().sum::<f64>(), sq.iter().sum::<f64>());
    for v in rest {
        let d = v.to_f64() - k;
        s1 += d;
        s2 += d * d;
    }
    let n = src.len() as f64;
    let var = ((s2 - s1 * s1 / n) / n).max(0.0);
    (k + s1 / n, 1.0 / (var + eps).sqrt())
}

/// One plane normalised, plus the residual (itself shifted and scaled: `(r - mean) * inv_std`),
/// through the LeakyReLU: in the plane's own precision (f32 planes in f32, which vectorises; the
/// statistics stay f64), written to `dst` without first filling it.
fn normalise_plane<T: WithDType>(
    dst: &mut [std::mem::MaybeUninit<T>],
    src: &[T],
    residual: Option<(&[T], (f64, f64))>,
    (mean, inv_std): (f64, f64),
    slope: f64,
) {
    let (m, s, a) = (T::from_f64(mean), T::from_f64(inv_std), T::from_f64(slope));
    let act = |v: T| if v > a * v { v } else { a * v };
    match residual {
        Some((r, (rm, rs))) => {
            let (rm, rs) = (T::from_f64(rm), T::from_f64(rs));
            for ((o, &v), &r) in dst.iter_mut().zip(src).zip(r) {
                o.write(act((v - m) * s + (r - rm) * rs));
            }
        }
        None => {
            for (o, &v) in dst.iter_mut().zip(src) {
                o.write(act((v - m) * s));
            }
        }
    }
}

fn instance_norm_planes<T: WithDType>(
    x: &[T],
    residual: Option<&[T]>,
    plane: usize,
    eps: f64,
    leaky_slope: Option<f64>,
    moments: Option<&[(f64, f64)]>,
    normalise_residual: bool,
) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    let slope = leaky_slope.unwrap_or(1.0);
    y.spare_capacity_mut()[..x.len()].par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(
        |(p, (dst, src))| {
            let r = residual.map(|r| &r[p * plane..(p + 1) * plane]);
            let stats = match moments {
                Some(m) => (m[p].0, 1.0 / (m[p].1 + eps).sqrt()),
                None => plane_statistics(src, eps),
            };
            // A plain residual is taken as (r - 0) * 1, which is r exactly.
            let r = r.map(|r| (r, if normalise_residual { plane_statistics(r, eps) } else { (0.0, 1.0) }));
            normalise_plane(dst, src, r, stats, slope);
        },
    );
    // SAFETY: the planes cover all x.len() values and each was written by `normalise_plane`.
    unsafe { y.set_len(x.len()) };
    y
}

impl InstanceNormCpu {
    fn run(&self, x: (&CpuStorage, &Layout), residual: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let range = |l: &Layout| super::contiguous_range(l, "prosam-instance-norm-cpu");
        let (start, end) = range(x.1)?;
        let plane: usize = x.1.dims().iter().skip(2).product();
        if plane == 0 {
            bail!("prosam-instance-norm-cpu: empty spatial extent");
        }
        let r_range = residual.map(|(_, l)| range(l)).transpose()?;
        let (eps, slope) = (self.eps, self.leaky_slope);
        let moments = self.moments.as_deref();
        if moments.is_some_and(|m| m.len() * plane != end - start) {
            bail!(
                "prosam-instance-norm-cpu: moments for {} planes, the input has {}",
                moments.map_or(0, |m| m.len()),
                (end - start) / plane
            );
        }
        let (r0, r1) = r_range.unwrap_or((0, 0));
        // One closure per element type: closures are not generic.
        let f32_planes = |v, r| instance_norm_planes(v, r, plane, eps, slope, moments, self.normalise_residual);
        let f64_planes = |v, r| instance_norm_planes(v, r, plane, eps, slope, moments, self.normalise_residual);
        let out = match (x.0, residual.map(|r| r.0)) {
            (CpuStorage::F32(v), None) => CpuStorage::F32(f32_planes(&v[start..end], None)),
            (CpuStorage::F64(v), None) => CpuStorage::F64(f64_planes(&v[start..end], None)),
            (CpuStorage::F32(v), Some(CpuStorage::F32(r))) => {
                CpuStorage::F32(f32_planes(&v[start..end], Some(&r[r0..r1])))
            }
            (CpuStorage::F64(v), Some(CpuStorage::F64(r))) => {
                CpuStorage::F64(f64_planes(&v[start..end], Some(&r[r0..r1])))
            }
            _ => bail!("prosam-instance-norm-cpu: only f32 and f64, one dtype for both inputs"),
        };
        Ok((out, x.1.shape().clone()))
    }
}

impl InstanceNormCpu {
    /// The gradient of the input (`want_input`) or of the residual, from the input `x`, the output
    /// `y` and the output's gradient.
    fn grad(&self, x: &Tensor, y: &Tensor, grad_y: &Tensor, want_input: bool) -> Result<Tensor> {
        let op = InstanceNormBackward { eps: self.eps, leaky_slope: self.leaky_slope, want_input };
        x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &grad_y.contiguous()?, &op)
    }
}

impl CustomOp1 for InstanceNormCpu {
    fn name(&self) -> &'static str {
        "prosam-instance-norm-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((storage, layout), None)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(x, y, grad_y, true)?))
    }
}

impl CustomOp2 for InstanceNormCpu {
    fn name(&self) -> &'static str {
        "prosam-instance-norm-cpu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(x, y, grad_y, true)?), Some(self.grad(x, y, grad_y, false)?)))
    }
}

/// The backward pass of [`InstanceNormCpu`]: `(x, y, dy)` to the input's or the residual's
/// gradient. With `dz = dy * act'(z)` (1 where `y > 0`, the slope elsewhere), the residual's is
/// `dz` and the input's `inv_std * (dz - mean(dz) - x_hat * mean(dz * x_hat))` per plane.
struct InstanceNormBackward {
    eps: f64,
    leaky_slope: Option<f64>,
    want_input: bool,
}

fn instance_norm_backward_planes<T: WithDType>(
    x: &[T],
    y: &[T],
    grad_y: &[T],
    plane: usize,
    op: &InstanceNormBackward,
) -> Vec<T> {
    let slope = op.leaky_slope.unwrap_or(1.0);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(plane).enumerate().for_each(|(p, dst)| {
        let range = p * plane..(p + 1) * plane;
        let (x, y, dy) = (&x[range.clone()], &y[range.clone()], &grad_y[range]);
        let dz = |i: usize| {
            let d = dy[i].to_f64();
            if y[i].to_f64() > 0.0 { d } else { d * slope }
        };
        if !op.want_input {
            dst.iter_mut().enumerate().for_each(|(i, o)| *o = T::from_f64(dz(i)));
            return;
        }
        let (mean, inv_std) = plane_statistics(x, op.eps);
        let n = plane as f64;
        let (mut sum_dz, mut sum_dz_xhat) = (0.0, 0.0);
        for (i, v) in x.iter().enumerate() {
            let d = dz(i);
            sum_dz += d;
            sum_dz_xhat += d * (v.to_f64() - mean) * inv_std;
        }
        let (mean_dz, mean_dz_xhat) = (sum_dz / n, sum_dz_xhat / n);
        for (i, (o, v)) in dst.iter_mut().zip(x).enumerate() {
            let x_hat = (v.to_f64() - mean) * inv_std;
            *o = T::from_f64(inv_std * (dz(i) - mean_dz - x_hat * mean_dz_xhat));
        }
    });
    out
}

impl candle_core::CustomOp3 for InstanceNormBackward {
    fn name(&self) -> &'static str {
        "prosam-instance-norm-cpu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let range = |l: &Layout| super::contiguous_range(l, "prosam-instance-norm-cpu-backward");
        if l1.dims() != l2.dims() || l1.dims() != l3.dims() {
            bail!("prosam-instance-norm-cpu-backward: x, y and dy must share a shape");
        }
        let plane: usize = l1.dims().iter().skip(2).product();
        let ((a0, a1), (b0, b1), (c0, c1)) = (range(l1)?, range(l2)?, range(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(dy)) => {
                CpuStorage::F32(instance_norm_backward_planes(&x[a0..a1], &y[b0..b1], &dy[c0..c1], plane, self))
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(dy)) => {
                CpuStorage::F64(instance_norm_backward_planes(&x[a0..a1], &y[b0..b1], &dy[c0..c1], plane, self))
            }
            _ => bail!("prosam-instance-norm-cpu-backward: only f32 and f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// One input of a custom op: its storage and layout.
type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// Forward-only CPU layer norm over the last axis, optionally with `(weight, bias)`.
struct LayerNormCpu {
    eps: f64,
}

fn layer_norm_rows<T: WithDType>(x: &[T], c: usize, affine: Option<(&[T], &[T])>, eps: f64) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    // Rows in groups, so that a task is worth scheduling even for 12 channels.
    let group = (4096 / c.max(1)).max(1) * c;
    y.par_chunks_mut(group).zip(x.par_chunks(group)).for_each(|(dst, src)| {
        for (o, v) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
            let n = c as f64;
            let mean = v.iter().map(|a| a.to_f64()).sum::<f64>() / n;
            let var = v.iter().map(|a| (a.to_f64() - mean).powi(2)).sum::<f64>() / n;
            let inv_std = 1.0 / (var + eps).sqrt();
            match affine {
                Some((w, b)) => {
                    for (i, (o, a)) in o.iter_mut().zip(v).enumerate() {
                        *o = T::from_f64((a.to_f64() - mean) * inv_std * w[i].to_f64() + b[i].to_f64());
                    }
                }
                None => {
                    for (o, a) in o.iter_mut().zip(v) {
                        *o = T::from_f64((a.to_f64() - mean) * inv_std);
                    }
                }
            }
        }
    });
    y
}

impl LayerNormCpu {
    fn run(&self, x: (&CpuStorage, &Layout), affine: Option<(Operand, Operand)>) -> Result<(CpuStorage, Shape)> {
        let range = |l: &Layout| super::contiguous_range(l, "prosam-layer-norm-cpu");
        let c = *x.1.dims().last().unwrap_or(&0);
        if c == 0 {
            bail!("prosam-layer-norm-cpu: no channels");
        }
        let (x0, x1) = range(x.1)?;
        macro_rules! go {
            ($variant:ident) => {{
                let CpuStorage::$variant(xs) = x.0 else { bail!("prosam-layer-norm-cpu: inputs of one dtype") };
                let affine = match affine {
                    Some(((CpuStorage::$variant(w), lw), (CpuStorage::$variant(b), lb))) => {
                        let ((w0, w1), (b0, b1)) = (range(lw)?, range(lb)?);
                        Some((&w[w0..w1], &b[b0..b1]))
                    }
                    None => None,
                    _ => bail!("prosam-layer-norm-cpu: inputs of one dtype"),
                };
                CpuStorage::$variant(layer_norm_rows(&xs[x0..x1], c, affine, self.eps))
            }};
        }
        let storage = match x.0 {
            CpuStorage::F32(_) => go!(F32),
            CpuStorage::F64(_) => go!(F64),
            _ => bail!("prosam-layer-norm-cpu: only f32 and f64"),
        };
        Ok((storage, x.1.shape().clone()))
    }
}

impl CustomOp1 for LayerNormCpu {
    fn name(&self) -> &'static str {
        "prosam-layer-norm-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl candle_core::CustomOp3 for LayerNormCpu {
    fn name(&self) -> &'static str {
        "prosam-layer-norm-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), Some(((s2, l2), (s3, l3))))
    }
}
