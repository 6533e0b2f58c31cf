//! Shifted-window geometry of the Swin transformer, as MONAI's `swin_unetr.py` computes it:
//! per-stage window clamping, partition into windows and back, cyclic shifts, the attention mask
//! of shifted windows, and the relative-position index.
//!
//! Tensors here are channels-last, `(B, D, H, W, C)`. Windows are ordered batch-major, then by
//! window index (d, h, w) with w fastest; tokens inside a window are ordered the same way.

use candle_core::{DType, Device, Result, Tensor, bail};

/// Window edge and shift per axis for a stage of spatial size `dims`: MONAI's `get_window_size`
/// clamps an axis no longer than the window to the axis itself and disables its shift.
pub fn stage_window(dims: [usize; 3], window: usize, shift: usize) -> ([usize; 3], [usize; 3]) {
    let mut ws = [window; 3];
    let mut ss = [shift; 3];
    for axis in 0..3 {
        if dims[axis] <= window {
            ws[axis] = dims[axis];
            ss[axis] = 0;
        }
    }
    (ws, ss)
}

/// Each axis rounded up to a multiple of its window.
pub fn padded_dims(dims: [usize; 3], ws: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| dims[a].div_ceil(ws[a]) * ws[a])
}

/// `(B, Dp, Hp, Wp, C)` into `(B * nW, wd * wh * ww, C)`.
pub fn window_partition(x: &Tensor, ws: [usize; 3]) -> Result<Tensor> {
    let (b, d, h, w, c) = x.dims5()?;
    if d % ws[0] != 0 || h % ws[1] != 0 || w % ws[2] != 0 {
        bail!("window_partition: size {:?} is not a multiple of the window {ws:?}", (d, h, w));
    }
    let n = ws[0] * ws[1] * ws[2];
    x.reshape(vec![b, d / ws[0], ws[0], h / ws[1], ws[1], w / ws[2], ws[2], c])?
        .permute(vec![0, 1, 3, 5, 2, 4, 6, 7])?
        .reshape(((), n, c))
}

/// The inverse of [`window_partition`]: `(B * nW, n, C)` back into `(B, Dp, Hp, Wp, C)`.
pub fn window_reverse(windows: &Tensor, ws: [usize; 3], dims: [usize; 3]) -> Result<Tensor> {
    let (bn, n, c) = windows.dims3()?;
    let [d, h, w] = dims;
    if n != ws[0] * ws[1] * ws[2] || d % ws[0] != 0 || h % ws[1] != 0 || w % ws[2] != 0 {
        bail!("window_reverse: {n} tokens per window do not tile {dims:?} with window {ws:?}");
    }
    let nw = (d / ws[0]) * (h / ws[1]) * (w / ws[2]);
    if bn % nw != 0 {
        bail!("window_reverse: {bn} windows are not a multiple of the {nw} windows of {dims:?}");
    }
    windows
        .reshape(vec![bn / nw, d / ws[0], h / ws[1], w / ws[2], ws[0], ws[1], ws[2], c])?
        .permute(vec![0, 1, 4, 2, 5, 3, 6, 7])?
        .reshape((bn / nw, d, h, w, c))
}

/// `torch.roll(x, shifts, dims=(1, 2, 3))` on a channels-last volume.
pub fn roll_spatial(x: &Tensor, shifts: [i32; 3]) -> Result<Tensor> {
    let mut x = x.clone();
    for (axis, &s) in shifts.iter().enumerate() {
        if s != 0 {
            x = x.roll(s, axis + 1)?;
        }
    }
    Ok(x)
}

/// The regions of shifted windows, `(nW, n)` u32: for every token of every window, the region of
/// the shifted grid it comes from (MONAI's `compute_mask` before its pairwise comparison). Two
/// tokens may attend to each other only within one region; [`shift_mask_from_regions`] makes the
/// additive mask, and the fused CPU attention compares regions itself.
///
/// `padded` is the padded stage size. The regions follow Python's slicing exactly, including
/// a zero shift on an axis, where `slice(-0, None)` is the whole axis.
pub fn compute_shift_regions(padded: [usize; 3], ws: [usize; 3], shift: [usize; 3], device: &Device) -> Result<Tensor> {
    let [d, h, w] = padded;
    let mut region = vec![0u32; d * h * w];
    let ranges = |axis: usize| -> [std::ops::Range<usize>; 3] {
        let len = padded[axis] as i64;
        let (win, s) = (ws[axis] as i64, shift[axis] as i64);
        [py_slice(None, Some(-win), len), py_slice(Some(-win), Some(-s), len), py_slice(Some(-s), None, len)]
    };
    let mut label = 0u32;
    for rd in ranges(0) {
        for rh in ranges(1) {
            for rw in ranges(2) {
                for i in rd.clone() {
                    for j in rh.clone() {
                        for k in rw.clone() {
                            region[(i * h + j) * w + k] = label;
                        }
                    }
                }
                label += 1;
            }
        }
    }
    let n = ws[0] * ws[1] * ws[2];
    let (nd, nh, nw) = (d / ws[0], h / ws[1], w / ws[2]);
    let mut labels = vec![0u32; nd * nh * nw * n];
    for (win, window) in labels.chunks_exact_mut(n).enumerate() {
        let (wd, wh, ww) = (win / (nh * nw), (win / nw) % nh, win % nw);
        for (t, l) in window.iter_mut().enumerate() {
            let (td, th, tw) = (t / (ws[1] * ws[2]), (t / ws[2]) % ws[1], t % ws[2]);
            *l = region[((wd * ws[0] + td) * h + wh * ws[1] + th) * w + ww * ws[2] + tw];
        }
    }
    Tensor::from_vec(labels, (nd * nh * nw, n), device)
}

/// The additive mask of `regions (nW, n)`, `(nW, n, n)` f32: 0 where two tokens of a window share
/// a region, -100 elsewhere (MONAI's value).
pub fn shift_mask_from_regions(regions: &Tensor) -> Result<Tensor> {
    let differ = regions.unsqueeze(2)?.broadcast_ne(&regions.unsqueeze(1)?)?;
    differ.to_dtype(DType::F32)? * -100.0
}

/// The attention mask of shifted windows, `(nW, n, n)`: 0 where two tokens of a window belong to
/// the same region of the shifted grid, -100 elsewhere (MONAI's `compute_mask`).
pub fn compute_shift_mask(padded: [usize; 3], ws: [usize; 3], shift: [usize; 3], device: &Device) -> Result<Tensor> {
    shift_mask_from_regions(&compute_shift_regions(padded, ws, shift, device)?)
}

/// The range Python's `x[start:stop]` selects on an axis of length `len` (step 1).
fn py_slice(start: Option<i64>, stop: Option<i64>, len: i64) -> std::ops::Range<usize> {
    let resolve = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
    let a = start.map_or(0, resolve);
    let b = stop.map_or(len, resolve);
    a as usize..b.max(a) as usize
}

/// Swin's relative-position index for a cubic window of edge `window`, restricted to the first
/// `n` tokens: `index[i][j] = (d_i - d_j + w - 1) (2w - 1)^2 + (h_i - h_j + w - 1) (2w - 1) + (w_i - w_j + w - 1)`
/// with token coordinates taken in the full window. MONAI slices the full index `[:n, :n]` for
/// clamped windows, so a token of a smaller window keeps its coordinates in the full one.
pub fn relative_position_index(window: usize, n: usize) -> Vec<u32> {
    let span = 2 * window - 1;
    let coord = |t: usize| (t / (window * window), (t / window) % window, t % window);
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        let (di, hi, wi) = coord(i);
        for j in 0..n {
            let (dj, hj, wj) = coord(j);
            let dd = di + window - 1 - dj;
            let dh = hi + window - 1 - hj;
            let dw = wi + window - 1 - wj;
            index.push(((dd * span + dh) * span + dw) as u32);
        }
    }
    index
}
