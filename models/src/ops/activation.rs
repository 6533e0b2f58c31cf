//! GELU in PyTorch's exact (erf) form, with a vectorised f32 CPU kernel: Candle's calls libm's
//! scalar `erff` per element, a tenth of a Swin stage's time at 96^3. The kernel serves training
//! too (its backward pass is the analytic derivative), so that a forward pass gives the same bits
//! with and without a gradient graph, which the teacher's block checkpointing relies on.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd;

/// `x / 2 * (1 + erf(x / sqrt 2))`, element-wise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let x = x.contiguous()?;
        return if x.track_op() { x.apply_op1(GeluCpu) } else { x.apply_op1_no_bwd(&GeluCpu) };
    }
    x.gelu_erf()
}

struct GeluCpu;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn gelu_slice<const FMA: bool>(src: &[f32], dst: &mut [f32]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o = simd::gelu_erf::<FMA>(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_slice_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_slice::<true>(src, dst)
}

impl CustomOp1 for GeluCpu {
    fn name(&self) -> &'static str {
        "prosam-gelu-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            bail!("prosam-gelu-cpu: a contiguous f32 input");
        };
        let x = &x[start..end];
        let isa = simd::Isa::detect();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(dst, src)| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
            simd::Isa::Avx2Fma => unsafe { gelu_slice_avx2(src, dst) },
            _ => gelu_slice::<{ simd::BASELINE_FMA }>(src, dst),
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `d GELU / dx = Phi(x) + x phi(x)`, from Candle's ops.
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = (x.sqr()? * -0.5)?.exp()? * (2.0 * std::f64::consts::PI).sqrt().recip();
        Ok(Some(grad_y.mul(&(cdf? + x.mul(&pdf?)?)?)?))
    }
}
