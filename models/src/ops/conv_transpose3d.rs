//! 3D transposed convolution with kernel equal to stride and no padding, as UNETR's up-sampling
//! blocks use it (`ConvTranspose3d(k=2, s=2)`): every input voxel writes its own disjoint
//! `k x k x k` output block, so the whole op is one matrix product and a reshape.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

/// `x (B, Cin, D, H, W)`, `w (Cin, Cout, k, k, k)` with stride `k`, optional `bias (Cout)`;
/// returns `(B, Cout, kD, kH, kW)`:
/// `out[o, k*i+a, k*j+b, k*l+c] = bias[o] + sum_in x[in, i, j, l] * w[in, o, a, b, c]`.
pub fn conv_transpose3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize) -> Result<Tensor> {
    let (b, c_in, d, h, wd) = x.dims5()?;
    let (w_in, c_out, kd, kh, kw) = w.dims5()?;
    if w_in != c_in {
        bail!("conv_transpose3d: input has {c_in} channels but the weight {:?} expects {w_in}", w.dims());
    }
    let k = stride;
    if (kd, kh, kw) != (k, k, k) {
        bail!("conv_transpose3d: only kernel == stride is supported, got kernel {:?} and stride {k}", (kd, kh, kw));
    }
    if let Some(y) = cpu_kernel(x, w, None)? {
        return match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, c_out, 1, 1, 1))?),
            None => Ok(y),
        };
    }
    let n = d * h * wd;
    // (B, N, Cin) x (Cin, Cout*k^3) -> (B, N, Cout*k^3)
    let rows = x.reshape((b, c_in, n))?.transpose(1, 2)?.contiguous()?;
    let y = rows.broadcast_matmul(&w.reshape((c_in, c_out * k * k * k))?)?;
    let y = y.reshape(vec![b, d, h, wd, c_out, k, k, k])?.permute(vec![0, 4, 1, 5, 2, 6, 3, 7])?.reshape((
        b,
        c_out,
        d * k,
        h * k,
        wd * k,
    ))?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, c_out, 1, 1, 1))?),
        None => Ok(y),
    }
}

/// `cat([conv_transpose3d(x, w, stride = kernel), skip], channels)`: UNETR's up-sampling step. On the
/// CPU at inference one kernel writes both parts into the output, where the composed form copies
/// the up-sampled volume three times (transpose, 8-axis permutation, concatenation).
pub fn conv_transpose3d_cat(x: &Tensor, w: &Tensor, skip: &Tensor) -> Result<Tensor> {
    let (_, c_in, _, _, _) = x.dims5()?;
    let (w_in, _, k, _, _) = w.dims5()?;
    if w_in != c_in {
        bail!("conv_transpose3d: input has {c_in} channels but the weight {:?} expects {w_in}", w.dims());
    }
    if let Some(y) = cpu_kernel(x, w, Some(skip))? {
        return Ok(y);
    }
    Tensor::cat(&[&conv_transpose3d(x, w, None, k)?, skip], 1)
}

/// The CPU kernel, when it applies: f32/f64 on the CPU, no gradient recorded, a cubic kernel.
fn cpu_kernel(x: &Tensor, w: &Tensor, skip: Option<&Tensor>) -> Result<Option<Tensor>> {
    let tracked = x.track_op() || w.track_op() || skip.is_some_and(|s| s.track_op());
    let (_, _, kd, kh, kw) = w.dims5()?;
    let dtypes_agree = x.dtype() == w.dtype() && skip.is_none_or(|s| s.dtype() == x.dtype());
    if tracked
        || !x.device().is_cpu()
        || !matches!(x.dtype(), DType::F32 | DType::F64)
        || !dtypes_agree
        || kd != kh
        || kh != kw
    {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(Some(match skip {
        Some(s) => x.apply_op3_no_bwd(&w, &s.contiguous()?, &UpsampleCpu)?,
        None => x.apply_op2_no_bwd(&w, &UpsampleCpu)?,
    }))
}

/// Transposed convolution with kernel == stride (`k`), optionally followed by skip channels.
struct UpsampleCpu;

/// `out (C_out + C_skip, kD, kH, kW)` per sample. Each task writes one output channel's `k` depth
/// slices above one input slice: for every output row, `k` partial rows (one per x tap) are
/// accumulated over the input channels and interleaved.
#[allow(clippy::too_many_arguments)]
fn upsample<T: WithDType>(
    x: &[T],
    w: &[T],
    skip: Option<&[T]>,
    batch: usize,
    c_in: usize,
    c_out: usize,
    dims: [usize; 3],
    k: usize,
) -> Vec<T> {
    let [d, h, wd] = dims;
    let n_in = d * h * wd;
    let n_out = n_in * k * k * k;
    let c_skip = skip.map_or(0, |s| s.len() / (batch * n_out));
    let c_total = c_out + c_skip;
    let len = batch * c_total * n_out;
    // Written whole below (skip channels copied, the others row by row): no zero fill first.
    let mut out = Vec::with_capacity(len);
    // One chunk: k output depth slices of one channel of one sample.
    let chunk = k * k * h * k * wd;
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk).enumerate().for_each_init(
        || vec![T::zero(); k * wd],
        |partial, (index, dst)| {
            let (b, rest) = (index / (c_total * d), index % (c_total * d));
            let (o, i) = (rest / d, rest % d);
            if o >= c_out {
                let s = skip.expect("channels past c_out are the skip's");
                let start = ((b * c_skip + o - c_out) * d + i) * chunk;
                dst.iter_mut().zip(&s[start..start + chunk]).for_each(|(d, v)| {
                    d.write(*v);
                });
                return;
            }
            let x = &x[b * c_in * n_in..(b + 1) * c_in * n_in];
            for a in 0..k {
                for j in 0..h {
                    for bb in 0..k {
                        partial.iter_mut().for_each(|p| *p = T::zero());
                        for ci in 0..c_in {
                            let row = &x[(ci * d + i) * h * wd + j * wd..][..wd];
                            for c in 0..k {
                                let weight = w[(((ci * c_out + o) * k + a) * k + bb) * k + c];
                                for (p, v) in partial[c * wd..(c + 1) * wd].iter_mut().zip(row) {
                                    *p += weight * *v;
                                }
                            }
                        }
                        let out_row = &mut dst[(a * k * h + j * k + bb) * k * wd..][..k * wd];
                        for (l, o) in out_row.chunks_exact_mut(k).enumerate() {
                            for (c, v) in o.iter_mut().enumerate() {
                                v.write(partial[c * wd + l]);
                            }
                        }
                    }
                }
            }
        },
    );
    // SAFETY: every chunk of the `len` values was written above.
    unsafe { out.set_len(len) };
    out
}

impl UpsampleCpu {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        skip: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let range = |l: &Layout| super::contiguous_range(l, "prosam-upsample-cpu");
        let (b, c_in, d, h, wd) = x.1.shape().dims5()?;
        let (w_in, c_out, k, _, _) = w.1.shape().dims5()?;
        if w_in != c_in {
            bail!("prosam-upsample-cpu: {c_in} input channels, the weight expects {w_in}");
        }
        let out_dims = [d * k, h * k, wd * k];
        let c_skip = match skip {
            Some((_, l)) => {
                let (sb, sc, sd, sh, sw) = l.shape().dims5()?;
                if sb != b || [sd, sh, sw] != out_dims {
                    bail!("prosam-upsample-cpu: skip {:?} does not match the up-sampled {:?}", l.dims(), out_dims);
                }
                sc
            }
            None => 0,
        };
        let ((x0, x1), (w0, w1)) = (range(x.1)?, range(w.1)?);
        let s_range = skip.map(|(_, l)| range(l)).transpose()?;
        macro_rules! go {
            ($variant:ident) => {{
                let (CpuStorage::$variant(xs), CpuStorage::$variant(ws)) = (x.0, w.0) else {
                    bail!("prosam-upsample-cpu: inputs of one dtype")
                };
                let skip = match (skip, s_range) {
                    (Some((CpuStorage::$variant(s), _)), Some((s0, s1))) => Some(&s[s0..s1]),
                    (None, _) => None,
                    _ => bail!("prosam-upsample-cpu: inputs of one dtype"),
                };
                CpuStorage::$variant(upsample(&xs[x0..x1], &ws[w0..w1], skip, b, c_in, c_out, [d, h, wd], k))
            }};
        }
        let storage = match x.0 {
            CpuStorage::F32(_) => go!(F32),
            CpuStorage::F64(_) => go!(F64),
            _ => bail!("prosam-upsample-cpu: only f32 and f64"),
        };
        Ok((storage, Shape::from((b, c_out + c_skip, out_dims[0], out_dims[1], out_dims[2]))))
    }
}

impl CustomOp2 for UpsampleCpu {
    fn name(&self) -> &'static str {
        "prosam-upsample-cpu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for UpsampleCpu {
    fn name(&self) -> &'static str {
        "prosam-upsample-cpu"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}
