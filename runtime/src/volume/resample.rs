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

/// The label map on the CT's own grid: for every oriented voxel, the class probabilities
/// `probs` (`classes x model_dims`, C order) interpolated trilinearly at model coordinate
/// `i * ratio` (border), then the first class of highest probability. Each label is written to
/// `labels[base + sum_k i_k * strides[k]]`, undoing the orientation on the fly.
///
/// Separable and slab by slab: the full-resolution probabilities never exist at once.
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
    let [mx, my, mz] = model_dims;
    let [n0, n1, n2] = oriented_dims;
    let t = [0, 1, 2].map(|a| taps(oriented_dims[a], model_dims[a], ratio[a]));
    let plane = my * mz;
    for chunk_start in (0..n0).step_by(ROWS_PER_CHUNK) {
        let rows: Vec<usize> = (chunk_start..(chunk_start + ROWS_PER_CHUNK).min(n0)).collect();
        let chunk: Vec<Vec<u8>> = rows
            .par_iter()
            .map(|&r| {
                let (x0, x1, tx) = t[0][r];
                let (tx, sx) = (tx as f32, 1.0 - tx as f32);
                // Along x: classes x (my x mz).
                let mut along_x = vec![0f32; classes * plane];
                for c in 0..classes {
                    let p = &probs[c * mx * plane..(c + 1) * mx * plane];
                    let (a, b) = (&p[x0 * plane..(x0 + 1) * plane], &p[x1 * plane..(x1 + 1) * plane]);
                    for ((o, va), vb) in along_x[c * plane..(c + 1) * plane].iter_mut().zip(a).zip(b) {
                        *o = va * sx + vb * tx;
                    }
                }
                // Along y: classes x (n1 x mz).
                let mut along_y = vec![0f32; classes * n1 * mz];
                for c in 0..classes {
                    let src = &along_x[c * plane..(c + 1) * plane];
                    for (j, dst) in along_y[c * n1 * mz..(c + 1) * n1 * mz].chunks_exact_mut(mz).enumerate() {
                        let (y0, y1, ty) = t[1][j];
                        let (ty, sy) = (ty as f32, 1.0 - ty as f32);
                        let (a, b) = (&src[y0 * mz..(y0 + 1) * mz], &src[y1 * mz..(y1 + 1) * mz]);
                        for ((o, va), vb) in dst.iter_mut().zip(a).zip(b) {
                            *o = va * sy + vb * ty;
                        }
                    }
                }
                // Along z, then the first class of highest probability.
                let mut out = vec![0u8; n1 * n2];
                for j in 0..n1 {
                    for (k, label) in out[j * n2..(j + 1) * n2].iter_mut().enumerate() {
                        let (z0, z1, tz) = t[2][k];
                        let (tz, sz) = (tz as f32, 1.0 - tz as f32);
                        let mut best = f32::NEG_INFINITY;
                        for c in 0..classes {
                            let row = &along_y[(c * n1 + j) * mz..(c * n1 + j + 1) * mz];
                            let v = row[z0] * sz + row[z1] * tz;
                            if v > best {
                                best = v;
                                *label = c as u8;
                            }
                        }
                    }
                }
                out
            })
            .collect();
        for (&r, row_labels) in rows.iter().zip(chunk) {
            let row_base = base as isize + r as isize * strides[0];
            for j in 0..n1 {
                let line = row_base + j as isize * strides[1];
                for (k, &l) in row_labels[j * n2..(j + 1) * n2].iter().enumerate() {
                    labels[(line + k as isize * strides[2]) as usize] = l;
                }
            }
        }
    }
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
        // Three classes on a 4x3x5 model grid, mapped onto a 7x5x9 grid stored with axis 0 reversed.
        let (classes, md, od) = (3, [4, 3, 5], [7, 5, 9]);
        let n: usize = md.iter().product();
        let probs: Vec<f32> = (0..classes * n).map(|v| ((v * 7919) % 101) as f32 / 101.0).collect();
        let ratio = [0.5, 0.5, 0.5];
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
                    let p = [i as f64 * 0.5, j as f64 * 0.5, k as f64 * 0.5];
                    let vals: Vec<f64> = (0..classes).map(|c| interp(c, p)).collect();
                    let best = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let got = labels[(6 - i) + 7 * j + 35 * k] as usize;
                    assert!(vals[got] >= best - 1e-5, "({i},{j},{k}): label {got} with {} < {best}", vals[got]);
                }
            }
        }
    }
}
