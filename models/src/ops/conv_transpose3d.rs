//! 3D transposed convolution with kernel equal to stride and no padding, as UNETR's up-sampling
//! blocks use it (`ConvTranspose3d(k=2, s=2)`): every input voxel writes its own disjoint
//! `k x k x k` output block, so the whole op is one matrix product and a reshape.

use candle_core::{Result, Tensor, bail};

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
