//! Resampling between the oriented CT grid and the model's grid, with MONAI `Spacing` semantics
//! (trilinear, border padding, align_corners false).
//!
//! Orientation only permutes and flips axes, so the oriented and model grids share direction
//! cosines and the voxel-to-voxel map is a scaling per axis: model voxel j reads oriented
//! coordinate `j * new / old`, and oriented voxel i reads model coordinate `i * old / new`.

use rayon::prelude::*;

/// MONAI's output size along one axis: `round(extent + 1)` with the extent `(n - 1) * old / new`,
/// rounding half to even as NumPy does (30 slices of 3 mm at 2 mm give 44, not 45).
pub fn resampled_size(n: usize, old_spacing: f64, new_spacing: f64) -> usize {
    let size = ((n as f64 - 1.0) * old_spacing / new_spacing + 1.0).round_ties_even();
    (size as usize).max(1)
}

/// Linear interpolation taps along one axis: for each output index, the two input indices and
/// the weight of the second, for input coordinate `j * ratio` clamped to `[0, n - 1]`.
pub fn taps(out_len: usize, n: usize, ratio: f64) -> Vec<(usize, usize, f64)> {
    (0..out_len)
        .map(|j| {
            let x = (j as f64 * ratio).clamp(0.0, (n - 1) as f64);
            let i0 = x.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            (i0, i1, x - i0 as f64)
        })
        .collect()
}

/// Trilinear resampling of a strided view (`data[base + sum_k i_k * strides[k]]` for
/// `i < in_dims`) onto `out_dims`, output in C order (last axis fastest). Computed in f64.
pub fn resample_view(
    data: &[f32],
    base: usize,
    strides: [isize; 3],
    in_dims: [usize; 3],
    out_dims: [usize; 3],
    ratio: [f64; 3],
) -> Vec<f32> {
    let t = [0, 1, 2].map(|a| taps(out_dims[a], in_dims[a], ratio[a]));
    let at = |i: usize, j: usize, k: usize| -> f64 {
        let off = base as isize + i as isize * strides[0] + j as isize * strides[1] + k as isize * strides[2];
        data[off as usize] as f64
    };
    let mut out = vec![0f32; out_dims.iter().product()];
    out.par_chunks_mut(out_dims[1] * out_dims[2]).enumerate().for_each(|(x, plane)| {
        let (x0, x1, tx) = t[0][x];
        for (y, row) in plane.chunks_exact_mut(out_dims[2]).enumerate() {
            let (y0, y1, ty) = t[1][y];
            for (z, v) in row.iter_mut().enumerate() {
                let (z0, z1, tz) = t[2][z];
                let lerp_z = |i, j| at(i, j, z0) * (1.0 - tz) + at(i, j, z1) * tz;
                let lerp_y = |i| lerp_z(i, y0) * (1.0 - ty) + lerp_z(i, y1) * ty;
                *v = (lerp_y(x0) * (1.0 - tx) + lerp_y(x1) * tx) as f32;
            }
        }
    });
    out
}

/// Oriented rows processed between two scatters into the stored-order labels.
const ROWS_PER_CHUNK: usize = 16;

/// Model planes held before the ready rows are written even if they are fewer than a chunk (a
/// CT coarser than the model grid along the first axis has several planes per row).
pub const MAX_HELD_PLANES: usize = 8;

/// The label map on the CT's own grid, built as model-grid planes of class probabilities
/// arrive: for every oriented voxel, the probabilities interpolated trilinearly at model
/// coordinate `i * ratio` (border), then the first class of highest probability. Each label is
/// written to `labels[base + sum_k i_k * strides[k]]`, undoing the orientation on the fly.
///
/// An oriented row needs only the two model planes around it, so planes are dropped once the
/// rows past them are done: with [`crate::pipeline::sliding_window::Accumulator`] handing planes
/// on, the class probabilities of the whole model grid never exist at once.
pub struct LabelRestore<'a> {
    classes: usize,
    model_dims: [usize; 3],
    oriented_dims: [usize; 3],
    taps: [Vec<(usize, usize, f64)>; 3],
    /// The last axis's taps apart (lower index, upper index, weight of the upper), for the
    /// vectorised inner loop.
    z_taps: (Vec<usize>, Vec<usize>, Vec<f32>),
    labels: &'a mut [u8],
    base: usize,
    strides: [isize; 3],
    /// Model plane of `planes[0]`; each plane is `classes x model_dims[1] x model_dims[2]`.
    first: usize,
    planes: Vec<Vec<f32>>,
    /// Oriented rows below this one are written.
    next_row: usize,
}

impl<'a> LabelRestore<'a> {
    pub fn new(
        classes: usize,
        model_dims: [usize; 3],
        oriented_dims: [usize; 3],
        ratio: [f64; 3],
        labels: &'a mut [u8],
        base: usize,
        strides: [isize; 3],
    ) -> Self {
        let taps = [0, 1, 2].map(|a| taps(oriented_dims[a], model_dims[a], ratio[a]));
        let z = &taps[2];
        let z_taps =
            (z.iter().map(|t| t.0).collect(), z.iter().map(|t| t.1).collect(), z.iter().map(|t| t.2 as f32).collect());
        LabelRestore {
            classes,
            model_dims,
            oriented_dims,
            taps,
            z_taps,
            labels,
            base,
            strides,
            first: 0,
            planes: Vec::new(),
            next_row: 0,
        }
    }

    /// Takes model plane `plane` (they come in order, from 0) and writes the rows it completes,
    /// a chunk at a time.
    pub fn push(&mut self, plane: usize, probs: Vec<f32>) {
        assert_eq!(plane, self.first + self.planes.len(), "model planes out of order");
        debug_assert_eq!(probs.len(), self.classes * self.model_dims[1] * self.model_dims[2]);
        self.planes.push(probs);
        self.write_ready_rows(false);
    }

    /// Restores from probabilities held whole (`classes x model_dims`, C order).
    pub fn restore_all(mut self, probs: &[f32]) {
        let [mx, my, mz] = self.model_dims;
        for x in 0..mx {
            let plane = (0..self.classes).flat_map(|c| &probs[(c * mx + x) * my * mz..(c * mx + x + 1) * my * mz]);
            self.push(x, plane.copied().collect());
        }
        self.finish();
    }

    /// Writes the remaining rows once every plane has come.
    pub fn finish(mut self) {
        assert_eq!(self.first + self.planes.len(), self.model_dims[0], "finished before the last model plane");
        self.write_ready_rows(true);
        debug_assert_eq!(self.next_row, self.oriented_dims[0]);
    }

    fn write_ready_rows(&mut self, last: bool) {
        let have = self.first + self.planes.len();
        let n0 = self.oriented_dims[0];
        let mut end = self.next_row;
        while end < n0 && self.taps[0][end].1 < have {
            end += 1;
        }
        while self.next_row < end
            && (last || end - self.next_row >= ROWS_PER_CHUNK || self.planes.len() >= MAX_HELD_PLANES)
        {
            let rows = self.next_row..(self.next_row + ROWS_PER_CHUNK).min(end);
            let chunk: Vec<Vec<u8>> = rows.clone().into_par_iter().map(|r| self.row_labels(r)).collect();
            let [_, n1, n2] = self.oriented_dims;
            for (r, row_labels) in rows.clone().zip(chunk) {
                let row_base = self.base as isize + r as isize * self.strides[0];
                for j in 0..n1 {
                    let line = row_base + j as isize * self.strides[1];
                    for (k, &l) in row_labels[j * n2..(j + 1) * n2].iter().enumerate() {
                        self.labels[(line + k as isize * self.strides[2]) as usize] = l;
                    }
                }
            }
            self.next_row = rows.end;
        }
        let keep_from = if self.next_row < n0 { self.taps[0][self.next_row].0 } else { have };
        let drop = keep_from.saturating_sub(self.first).min(self.planes.len());
        self.planes.drain(..drop);
        self.first += drop;
    }

    /// The labels of oriented row `r` (`n1 x n2`): separable, along x, then y, then z.
    fn row_labels(&self, r: usize) -> Vec<u8> {
        let [_, my, mz] = self.model_dims;
        let [_, n1, n2] = self.oriented_dims;
        let (classes, plane) = (self.classes, my * mz);
        let (x0, x1, tx) = self.taps[0][r];
        let (tx, sx) = (tx as f32, 1.0 - tx as f32);
        let (p0, p1) = (&self.planes[x0 - self.first], &self.planes[x1 - self.first]);
        // Along x: classes x (my x mz).
        let mut along_x = vec![0f32; classes * plane];
        for ((o, va), vb) in along_x.iter_mut().zip(p0).zip(p1) {
            *o = va * sx + vb * tx;
        }
        // Along y: classes x (n1 x mz).
        let mut along_y = vec![0f32; classes * n1 * mz];
        for c in 0..classes {
            let src = &along_x[c * plane..(c + 1) * plane];
            for (j, dst) in along_y[c * n1 * mz..(c + 1) * n1 * mz].chunks_exact_mut(mz).enumerate() {
                let (y0, y1, ty) = self.taps[1][j];
                let (ty, sy) = (ty as f32, 1.0 - ty as f32);
                let (a, b) = (&src[y0 * mz..(y0 + 1) * mz], &src[y1 * mz..(y1 + 1) * mz]);
                for ((o, va), vb) in dst.iter_mut().zip(a).zip(b) {
                    *o = va * sy + vb * ty;
                }
            }
        }
        // Along z, class by class over the row, then the first class of highest probability
        // (the comparisons run along the row, so they vectorize).
        let (z_lo, z_hi, z_t) = &self.z_taps;
        let mut out = vec![0u8; n1 * n2];
        let (mut best, mut value) = (vec![0f32; n2], vec![0f32; n2]);
        for (j, labels) in out.chunks_exact_mut(n2).enumerate() {
            best.fill(f32::NEG_INFINITY);
            for c in 0..classes {
                let row = &along_y[(c * n1 + j) * mz..(c * n1 + j + 1) * mz];
                for (k, v) in value.iter_mut().enumerate() {
                    let tz = z_t[k];
                    *v = row[z_lo[k]] * (1.0 - tz) + row[z_hi[k]] * tz;
                }
                for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(&value) {
                    if v > *b {
                        *b = v;
                        *l = c as u8;
                    }
                }
            }
        }
        out
    }
}

/// [`LabelRestore`] over probabilities held whole (`classes x model_dims`, C order).
#[allow(clippy::too_many_arguments)]
pub fn labels_from_probabilities(
    probs: &[f32],
    classes: usize,
    model_dims: [usize; 3],
    oriented_dims: [usize; 3],
    ratio: [f64; 3],
    labels: &mut [u8],
    base: usize,
    strides: [isize; 3],
) {
    LabelRestore::new(classes, model_dims, oriented_dims, ratio, labels, base, strides).restore_all(probs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monai_output_sizes() {
        assert_eq!(resampled_size(30, 3.0, 2.0), 44);
        assert_eq!(resampled_size(122, 3.0, 1.5), 243);
        assert_eq!(resampled_size(101, 3.0, 1.5), 201);
        assert_eq!(resampled_size(112, 3.0, 2.0), 168);
        assert_eq!(resampled_size(512, 0.7, 1.5), 239);
    }

    #[test]
    fn resampling_matches_pointwise_trilinear() {
        let dims = [5, 4, 6];
        let data: Vec<f32> = (0..120).map(|v| ((v * 37) % 11) as f32 - 3.0).collect();
        let strides = [1isize, 5, 20];
        let ratio = [0.7, 1.3, 0.45];
        let out_dims = [7, 3, 13];
        let out = resample_view(&data, 0, strides, dims, out_dims, ratio);
        let get = |i: usize, j: usize, k: usize| data[i + 5 * j + 20 * k] as f64;
        for x in 0..7 {
            for y in 0..3 {
                for z in 0..13 {
                    let c = [x as f64 * ratio[0], y as f64 * ratio[1], z as f64 * ratio[2]];
                    let c = [0, 1, 2].map(|a| c[a].min((dims[a] - 1) as f64));
                    let f = c.map(|v| v.floor() as usize);
                    let mut v = 0.0;
                    for corner in 0..8 {
                        let idx =
                            [0, 1, 2].map(|a| if corner >> a & 1 == 1 { (f[a] + 1).min(dims[a] - 1) } else { f[a] });
                        let w: f64 = (0..3)
                            .map(|a| if corner >> a & 1 == 1 { c[a] - f[a] as f64 } else { 1.0 - (c[a] - f[a] as f64) })
                            .product();
                        v += w * get(idx[0], idx[1], idx[2]);
                    }
                    assert!((out[(x * 3 + y) * 13 + z] as f64 - v).abs() < 1e-5, "({x},{y},{z})");
                }
            }
        }
    }

    #[test]
    fn labels_are_the_argmax_of_interpolated_probabilities() {
        // Three classes on a model grid mapped onto a 7x5x9 grid stored with axis 0 reversed: a
        // model grid coarser than the CT (two rows a plane), and one finer along the first axis
        // (about 4.5 planes a row, more than the restore holds before writing).
        for (md, ratio) in [([4, 3, 5], [0.5, 0.5, 0.5]), ([29, 3, 5], [4.5, 0.5, 0.5])] {
            let (classes, od) = (3, [7, 5, 9]);
            let n: usize = md.iter().product();
            let probs: Vec<f32> = (0..classes * n).map(|v| ((v * 7919) % 101) as f32 / 101.0).collect();
            let mut labels = vec![255u8; 7 * 5 * 9];
            // Stored x-fastest, axis 0 flipped: oriented (i, j, k) -> stored (6 - i) + 7 j + 35 k.
            labels_from_probabilities(&probs, classes, md, od, ratio, &mut labels, 6, [-1, 7, 35]);
            let interp = |c: usize, p: [f64; 3]| {
                let mut v = 0.0;
                for corner in 0..8 {
                    let mut w = 1.0;
                    let mut idx = [0; 3];
                    for a in 0..3 {
                        let x = p[a].min((md[a] - 1) as f64);
                        let f = x.floor() as usize;
                        let up = corner >> a & 1 == 1;
                        idx[a] = if up { (f + 1).min(md[a] - 1) } else { f };
                        w *= if up { x - f as f64 } else { 1.0 - (x - f as f64) };
                    }
                    v += w * probs[c * n + (idx[0] * md[1] + idx[1]) * md[2] + idx[2]] as f64;
                }
                v
            };
            for i in 0..7 {
                for j in 0..5 {
                    for k in 0..9 {
                        let p = [i as f64 * ratio[0], j as f64 * ratio[1], k as f64 * ratio[2]];
                        let vals: Vec<f64> = (0..classes).map(|c| interp(c, p)).collect();
                        let best = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let got = labels[(6 - i) + 7 * j + 35 * k] as usize;
                        assert!(
                            vals[got] >= best - 1e-5,
                            "{md:?} ({i},{j},{k}): label {got} with {} < {best}",
                            vals[got]
                        );
                    }
                }
            }
        }
    }
}
