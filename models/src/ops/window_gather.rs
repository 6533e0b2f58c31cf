//! The data movement around a Swin block's window attention as two CPU kernels for inference.
//! Composed from Candle ops it is a chain of copies of the whole stage volume: zero padding to
//! whole windows (a copy per padded axis), the cyclic shift (`roll`: two narrows and a concat per
//! axis), the window partition (a permuted copy), and after attention the same in reverse plus
//! a crop and the residual sum, each a pass over 5 MB at the first stage of a 96^3 window. Here
//! each token is read and written once: [`partition_shifted`] gathers every window token from the
//! unpadded volume (zeros where it falls in the padding), [`add_reversed_shifted`] adds every
//! attended token back onto the residual stream at its place. While gradients are recorded they
//! are the composed ops, which define them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

use super::window::{roll_spatial, window_partition, window_reverse};

/// The window geometry both kernels share: window edge `ws`, padded stage size `padded`, shift.
#[derive(Clone, Copy)]
struct Geometry {
    ws: [usize; 3],
    padded: [usize; 3],
    shift: [usize; 3],
}

impl Geometry {
    fn check(&self, dims: [usize; 3]) -> Result<()> {
        for a in 0..3 {
            if self.ws[a] == 0
                || !self.padded[a].is_multiple_of(self.ws[a])
                || dims[a] > self.padded[a]
                || self.shift[a] >= self.padded[a]
            {
                bail!(
                    "window gather: size {dims:?}, padded {:?}, window {:?}, shift {:?} do not fit",
                    self.padded,
                    self.ws,
                    self.shift
                );
            }
        }
        Ok(())
    }

    fn windows_per_sample(&self) -> usize {
        (0..3).map(|a| self.padded[a] / self.ws[a]).product()
    }

    /// The (window, token) that padded, shifted position `p` of the stage lands in.
    fn window_token(&self, p: [usize; 3]) -> (usize, usize) {
        let [ws, pd] = [self.ws, self.padded];
        let win = ((p[0] / ws[0]) * (pd[1] / ws[1]) + p[1] / ws[1]) * (pd[2] / ws[2]) + p[2] / ws[2];
        let token = ((p[0] % ws[0]) * ws[1] + p[1] % ws[1]) * ws[2] + p[2] % ws[2];
        (win, token)
    }
}

fn dims5(l: &Layout, what: &str) -> Result<(usize, [usize; 3], usize)> {
    match *l.dims() {
        [b, d, h, w, c] => Ok((b, [d, h, w], c)),
        ref other => bail!("window gather: {what} must be (B, D, H, W, C), got {other:?}"),
    }
}

struct Partition(Geometry);

impl Partition {
    fn run<T: WithDType>(&self, x: &[T], batch: usize, dims: [usize; 3], c: usize) -> Vec<T> {
        let g = self.0;
        let n = g.ws.iter().product::<usize>();
        let nw = g.windows_per_sample();
        let [wh, ww] = [g.padded[1] / g.ws[1], g.padded[2] / g.ws[2]];
        let mut out = vec![T::zero(); batch * nw * n * c];
        out.par_chunks_mut(n * c).enumerate().for_each(|(index, window)| {
            let (b, win) = (index / nw, index % nw);
            let origin = [win / (wh * ww) * g.ws[0], win / ww % wh * g.ws[1], win % ww * g.ws[2]];
            for (t, dst) in window.chunks_exact_mut(c).enumerate() {
                let offset = [t / (g.ws[1] * g.ws[2]), t / g.ws[2] % g.ws[1], t % g.ws[2]];
                // rolled[p] = padded[(p + shift) mod P]; padded[q] = x[q] inside, 0 outside.
                let q: [usize; 3] = std::array::from_fn(|a| (origin[a] + offset[a] + g.shift[a]) % g.padded[a]);
                if (0..3).all(|a| q[a] < dims[a]) {
                    let at = (((b * dims[0] + q[0]) * dims[1] + q[1]) * dims[2] + q[2]) * c;
                    dst.copy_from_slice(&x[at..at + c]);
                }
            }
        });
        out
    }
}

impl CustomOp1 for Partition {
    fn name(&self) -> &'static str {
        "prosam-window-partition-shifted"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, dims, c) = dims5(l, "the volume")?;
        self.0.check(dims)?;
        let (x0, x1) = super::contiguous_range(l, "prosam-window-partition-shifted")?;
        let storage = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.run(&x[x0..x1], batch, dims, c)),
            CpuStorage::F64(x) => CpuStorage::F64(self.run(&x[x0..x1], batch, dims, c)),
            _ => bail!("prosam-window-partition-shifted: only f32 and f64"),
        };
        let n = self.0.ws.iter().product::<usize>();
        Ok((storage, Shape::from((batch * self.0.windows_per_sample(), n, c))))
    }
}

struct AddReversed(Geometry);

impl AddReversed {
    fn run<T: WithDType>(&self, x: &[T], windows: &[T], dims: [usize; 3], c: usize) -> Vec<T> {
        let g = self.0;
        let n = g.ws.iter().product::<usize>();
        let nw = g.windows_per_sample();
        let row = dims[2] * c;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(row).zip(x.par_chunks(row)).enumerate().for_each(|(r, (dst, src))| {
            let (b, z, y) = (r / (dims[0] * dims[1]), r / dims[1] % dims[0], r % dims[1]);
            for (xq, (o, v)) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)).enumerate() {
                // The reversed windows rolled back: position q reads padded position (q - shift) mod P.
                let p: [usize; 3] = std::array::from_fn(|a| ([z, y, xq][a] + g.padded[a] - g.shift[a]) % g.padded[a]);
                let (win, token) = g.window_token(p);
                let at = ((b * nw + win) * n + token) * c;
                for ((o, &v), &w) in o.iter_mut().zip(v).zip(&windows[at..at + c]) {
                    *o = v + w;
                }
            }
        });
        out
    }
}

impl CustomOp2 for AddReversed {
    fn name(&self) -> &'static str {
        "prosam-window-add-reversed-shifted"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, dims, c) = dims5(l1, "the residual")?;
        self.0.check(dims)?;
        let n = self.0.ws.iter().product::<usize>();
        if l2.dims() != [batch * self.0.windows_per_sample(), n, c] {
            bail!(
                "prosam-window-add-reversed-shifted: windows {:?} do not match the volume {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let range = |l| super::contiguous_range(l, "prosam-window-add-reversed-shifted");
        let ((x0, x1), (w0, w1)) = (range(l1)?, range(l2)?);
        let storage = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(self.run(&x[x0..x1], &w[w0..w1], dims, c)),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(self.run(&x[x0..x1], &w[w0..w1], dims, c)),
            _ => bail!("prosam-window-add-reversed-shifted: only f32 and f64 of one dtype"),
        };
        Ok((storage, l1.shape().clone()))
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) && !x.track_op()
}

/// The windows of `x (B, D, H, W, C)` zero-padded to `padded` and cyclically shifted by `-shift`:
/// `window_partition(roll(pad(x), -shift), ws)`, `(B * nW, n, C)`.
pub fn partition_shifted(x: &Tensor, ws: [usize; 3], padded: [usize; 3], shift: [usize; 3]) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1_no_bwd(&Partition(Geometry { ws, padded, shift }));
    }
    let (_, d, h, w, _) = x.dims5()?;
    let mut y = x.clone();
    for (axis, size) in [d, h, w].into_iter().enumerate() {
        if padded[axis] > size {
            y = y.pad_with_zeros(axis + 1, 0, padded[axis] - size)?;
        }
    }
    if shift != [0; 3] {
        y = roll_spatial(&y, shift.map(|s| -(s as i32)))?;
    }
    window_partition(&y, ws)
}

/// `x + crop(roll(window_reverse(windows), shift))`: the attended windows put back in place, the
/// shift undone, the padding cropped, added to the residual `x (B, D, H, W, C)`.
pub fn add_reversed_shifted(
    x: &Tensor,
    windows: &Tensor,
    ws: [usize; 3],
    padded: [usize; 3],
    shift: [usize; 3],
) -> Result<Tensor> {
    if fused(x) && fused(windows) && x.dtype() == windows.dtype() {
        return x.contiguous()?.apply_op2_no_bwd(&windows.contiguous()?, &AddReversed(Geometry { ws, padded, shift }));
    }
    let (_, d, h, w, _) = x.dims5()?;
    let mut y = window_reverse(windows, ws, padded)?;
    if shift != [0; 3] {
        y = roll_spatial(&y, shift.map(|s| s as i32))?;
    }
    x + y.narrow(1, 0, d)?.narrow(2, 0, h)?.narrow(3, 0, w)?
}
