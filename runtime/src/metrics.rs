//! Segmentation metrics as MONAI computes them, per class on two label maps of one grid: Dice
//! (`compute_dice`), normalized surface Dice (`compute_surface_dice`) and the 95th-percentile
//! Hausdorff distance (`compute_hausdorff_distance(percentile=95)`), distances in millimetres
//! from the voxel spacing.
//!
//! MONAI's conventions, which this module keeps:
//! - Dice: `2|P∩T| / (|P| + |T|)`; an empty truth gives NaN (`ignore_empty=True`), whatever the
//!   prediction, and the means skip NaN.
//! - Surfaces: a mask's edge is its voxels with a face neighbour (6-connectivity) outside the mask
//!   or outside the volume (`binary_erosion(mask) ^ mask` on the cropped, zero-padded mask).
//!   Distances run from each edge voxel of one mask to the nearest edge voxel of the other
//!   (`distance_transform_edt` with the spacing as `sampling`).
//! - NSD: the share of both edges' voxels within the tolerance of the other edge; NaN when both
//!   masks are empty, 0 when one is.
//! - HD95: the larger of the two directed 95th percentiles (`torch.quantile`'s linear
//!   interpolation); NaN when both masks are empty, infinite when one is.

use serde::Serialize;

/// One class's figures. NaN where MONAI gives NaN (see the module's conventions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub label: u8,
    #[serde(serialize_with = "finite_or_null")]
    pub dice: f64,
    #[serde(serialize_with = "finite_or_null")]
    pub nsd: f64,
    /// In mm; infinite when exactly one of the masks is empty (JSON: null, with the counts).
    #[serde(serialize_with = "finite_or_null")]
    pub hd95: f64,
    pub pred_voxels: u64,
    pub truth_voxels: u64,
}

/// NaN and infinities have no JSON form: they are written as null.
fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() { s.serialize_f64(*v) } else { s.serialize_none() }
}

/// The metrics of every class `1..classes` (background excluded, as MONAI's
/// `include_background=False`), for `pred` and `truth` laid out as [`crate::volume::Volume`]
/// (`[i + nx * (j + ny * k)]`) with voxel edges `spacing` mm long.
pub fn evaluate(
    pred: &[u8],
    truth: &[u8],
    dims: [usize; 3],
    spacing: [f64; 3],
    classes: u8,
    tolerance_mm: f64,
) -> Vec<ClassMetrics> {
    assert_eq!(pred.len(), dims.iter().product::<usize>(), "prediction size");
    assert_eq!(truth.len(), pred.len(), "truth size");
    (1..classes)
        .map(|label| {
            let p: Vec<bool> = pred.iter().map(|&v| v == label).collect();
            let t: Vec<bool> = truth.iter().map(|&v| v == label).collect();
            class_metrics(label, &p, &t, dims, spacing, tolerance_mm)
        })
        .collect()
}

/// The mean of the finite values (MONAI's `nanmean`, which also skips the infinite distances of a
/// class missed entirely: those are reported per class, not averaged). NaN when there are none.
pub fn mean_finite(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values.into_iter().filter(|v| v.is_finite()).fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

fn class_metrics(
    label: u8,
    p: &[bool],
    t: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
    tolerance: f64,
) -> ClassMetrics {
    let pred_voxels = p.iter().filter(|&&v| v).count() as u64;
    let truth_voxels = t.iter().filter(|&&v| v).count() as u64;
    let both = p.iter().zip(t).filter(|(a, b)| **a && **b).count() as u64;
    let dice = if truth_voxels == 0 { f64::NAN } else { 2.0 * both as f64 / (pred_voxels + truth_voxels) as f64 };
    let (nsd, hd95) = match (pred_voxels, truth_voxels) {
        (0, 0) => (f64::NAN, f64::NAN),
        (0, _) | (_, 0) => (0.0, f64::INFINITY),
        _ => {
            let (pred_to_truth, truth_to_pred) = surface_distances(p, t, dims, spacing);
            let within = |d: &[f64]| d.iter().filter(|&&x| x <= tolerance).count();
            let nsd = (within(&pred_to_truth) + within(&truth_to_pred)) as f64
                / (pred_to_truth.len() + truth_to_pred.len()) as f64;
            (nsd, quantile(pred_to_truth, 0.95).max(quantile(truth_to_pred, 0.95)))
        }
    };
    ClassMetrics { label, dice, nsd, hd95, pred_voxels, truth_voxels }
}

/// `torch.quantile(x, q)` with its default linear interpolation between the two nearest ranks.
fn quantile(mut x: Vec<f64>, q: f64) -> f64 {
    x.sort_by(f64::total_cmp);
    let pos = q * (x.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    x[lo] + (x[hi] - x[lo]) * (pos - lo as f64)
}

/// The distances (mm) from each edge voxel of `p` to the nearest edge voxel of `t`, and back; both
/// masks non-empty. Computed on the masks' joint bounding box with a one-voxel margin, which holds
/// every edge and every nearest edge.
fn surface_distances(p: &[bool], t: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> (Vec<f64>, Vec<f64>) {
    let at = |i: usize, j: usize, k: usize| i + dims[0] * (j + dims[1] * k);
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let v = at(i, j, k);
                if p[v] || t[v] {
                    for (a, c) in [i, j, k].into_iter().enumerate() {
                        lo[a] = lo[a].min(c);
                        hi[a] = hi[a].max(c);
                    }
                }
            }
        }
    }
    // The box with a margin of one voxel on each side, which may reach outside the volume: there
    // the masks are empty, as MONAI's CropForeground pads them.
    let size = [hi[0] - lo[0] + 3, hi[1] - lo[1] + 3, hi[2] - lo[2] + 3];
    let crop = |m: &[bool]| -> Vec<bool> {
        let mut out = vec![false; size[0] * size[1] * size[2]];
        for k in 0..size[2] - 2 {
            for j in 0..size[1] - 2 {
                for i in 0..size[0] - 2 {
                    out[(i + 1) + size[0] * ((j + 1) + size[1] * (k + 1))] = m[at(lo[0] + i, lo[1] + j, lo[2] + k)];
                }
            }
        }
        out
    };
    let (p, t) = (crop(p), crop(t));
    let (pe, te) = (edges(&p, size), edges(&t, size));
    let to_t = squared_distance_transform(&te, size, spacing);
    let to_p = squared_distance_transform(&pe, size, spacing);
    let pick = |edge: &[bool], dist: &[f64]| -> Vec<f64> {
        edge.iter().zip(dist).filter(|(e, _)| **e).map(|(_, d)| d.sqrt()).collect()
    };
    (pick(&pe, &to_t), pick(&te, &to_p))
}

/// The mask's voxels with a face neighbour outside it (the mask has an empty margin, so none
/// lies on the box's border).
fn edges(m: &[bool], size: [usize; 3]) -> Vec<bool> {
    let strides = [1, size[0], size[0] * size[1]];
    let mut out = vec![false; m.len()];
    for k in 1..size[2] - 1 {
        for j in 1..size[1] - 1 {
            for i in 1..size[0] - 1 {
                let v = i + strides[1] * j + strides[2] * k;
                out[v] = m[v] && strides.iter().any(|&s| !m[v - s] || !m[v + s]);
            }
        }
    }
    out
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest `true` voxel of `features`
/// (at least one), exact: Felzenszwalb and Huttenlocher's lower envelope of parabolas, one axis
/// after another, each axis weighted by its spacing.
fn squared_distance_transform(features: &[bool], size: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = features.iter().map(|&f| if f { 0.0 } else { f64::INFINITY }).collect();
    let strides = [1, size[0], size[0] * size[1]];
    let mut line = Vec::new();
    let mut out = Vec::new();
    for axis in 0..3 {
        let n = size[axis];
        let (o1, o2) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        for b in 0..size[o2] {
            for a in 0..size[o1] {
                let base = a * strides[o1] + b * strides[o2];
                line.clear();
                line.extend((0..n).map(|x| d[base + x * strides[axis]]));
                out.resize(n, 0.0);
                envelope_1d(&line, spacing[axis], &mut out);
                for (x, v) in out.iter().enumerate() {
                    d[base + x * strides[axis]] = *v;
                }
            }
        }
    }
    d
}

/// `out[x] = min_y f[y] + (h (x - y))²` for samples `h` mm apart.
fn envelope_1d(f: &[f64], h: f64, out: &mut [f64]) {
    let n = f.len();
    let finite: Vec<usize> = (0..n).filter(|&y| f[y].is_finite()).collect();
    if finite.is_empty() {
        out.fill(f64::INFINITY);
        return;
    }
    let pos = |y: usize| h * y as f64;
    // Parabola vertices of the lower envelope and where each starts to be the lowest.
    let mut v: Vec<usize> = Vec::with_capacity(finite.len());
    let mut z: Vec<f64> = Vec::with_capacity(finite.len() + 1);
    for &q in &finite {
        loop {
            let Some(&p) = v.last() else {
                v.push(q);
                z.push(f64::NEG_INFINITY);
                break;
            };
            let s = ((f[q] + pos(q) * pos(q)) - (f[p] + pos(p) * pos(p))) / (2.0 * (pos(q) - pos(p)));
            if s <= *z.last().expect("one per vertex") {
                v.pop();
                z.pop();
            } else {
                v.push(q);
                z.push(s);
                break;
            }
        }
    }
    let mut k = 0;
    for (x, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < pos(x) {
            k += 1;
        }
        let dx = pos(x) - pos(v[k]);
        *o = f[v[k]] + dx * dx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: every pair of edge voxels, in f64.
    fn naive(p: &[bool], t: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> (Vec<f64>, Vec<f64>) {
        let coords = |m: &[bool]| -> Vec<[f64; 3]> {
            let inside = |i: isize, j: isize, k: isize| {
                (0..dims[0] as isize).contains(&i)
                    && (0..dims[1] as isize).contains(&j)
                    && (0..dims[2] as isize).contains(&k)
                    && m[i as usize + dims[0] * (j as usize + dims[1] * k as usize)]
            };
            let mut out = Vec::new();
            for k in 0..dims[2] as isize {
                for j in 0..dims[1] as isize {
                    for i in 0..dims[0] as isize {
                        let edge = inside(i, j, k)
                            && [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
                                .iter()
                                .any(|&(a, b, c)| !inside(i - a, j - b, k - c) || !inside(i + a, j + b, k + c));
                        if edge {
                            out.push([i as f64 * spacing[0], j as f64 * spacing[1], k as f64 * spacing[2]]);
                        }
                    }
                }
            }
            out
        };
        let (a, b) = (coords(p), coords(t));
        let directed = |from: &[[f64; 3]], to: &[[f64; 3]]| -> Vec<f64> {
            from.iter()
                .map(|x| {
                    to.iter()
                        .map(|y| ((x[0] - y[0]).powi(2) + (x[1] - y[1]).powi(2) + (x[2] - y[2]).powi(2)).sqrt())
                        .fold(f64::INFINITY, f64::min)
                })
                .collect()
        };
        (directed(&a, &b), directed(&b, &a))
    }

    #[test]
    fn distance_transform_equals_brute_force_on_random_masks() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        for case in 0..20 {
            let dims = [5 + case % 4, 6 + case % 3, 4 + case % 5];
            let spacing = [0.7 + 0.1 * (case % 3) as f64, 1.3, 2.0 + 0.5 * (case % 2) as f64];
            let n = dims.iter().product();
            let p: Vec<bool> = (0..n).map(|_| next() < 0.3).collect();
            let t: Vec<bool> = (0..n).map(|_| next() < 0.2).collect();
            if !p.iter().any(|&v| v) || !t.iter().any(|&v| v) {
                continue;
            }
            let (mut a, mut b) = surface_distances(&p, &t, dims, spacing);
            let (mut ra, mut rb) = naive(&p, &t, dims, spacing);
            for v in [&mut a, &mut b, &mut ra, &mut rb] {
                v.sort_by(f64::total_cmp);
            }
            assert_eq!(a.len(), ra.len());
            assert_eq!(b.len(), rb.len());
            for (x, y) in a.iter().zip(&ra).chain(b.iter().zip(&rb)) {
                assert!((x - y).abs() < 1e-9, "case {case}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn quantile_interpolates_as_torch() {
        // torch.quantile(torch.tensor([1., 2., 3., 4., 10.]), 0.95) = 8.8
        assert!((quantile(vec![4.0, 1.0, 10.0, 3.0, 2.0], 0.95) - 8.8).abs() < 1e-12);
        assert_eq!(quantile(vec![7.0], 0.95), 7.0);
    }
    fn cube(dims: [usize; 3], lo: [usize; 3], edge: usize, label: u8) -> Vec<u8> {
        let mut v = vec![0u8; dims.iter().product()];
        for k in lo[2]..lo[2] + edge {
            for j in lo[1]..lo[1] + edge {
                for i in lo[0]..lo[0] + edge {
                    v[i + dims[0] * (j + dims[1] * k)] = label;
                }
            }
        }
        v
    }

    #[test]
    fn overlapping_cubes_by_hand() {
        // Two 4^3 cubes, the prediction one voxel along x: overlap 3x4x4 = 48, Dice 96/128. Each
        // has 56 edge voxels; 36 lie on both edges (distance 0), the other 20 one voxel from the
        // other's edge.
        let dims = [8, 6, 6];
        let truth = cube(dims, [1, 1, 1], 4, 1);
        let pred = cube(dims, [2, 1, 1], 4, 1);
        let m = evaluate(&pred, &truth, dims, [1.0, 1.0, 1.0], 2, 0.5)[0];
        assert_eq!((m.pred_voxels, m.truth_voxels), (64, 64));
        assert!((m.dice - 0.75).abs() < 1e-12);
        assert!((m.nsd - 72.0 / 112.0).abs() < 1e-12, "{}", m.nsd);
        assert!((m.hd95 - 1.0).abs() < 1e-12);
        let m = evaluate(&pred, &truth, dims, [2.0, 1.0, 1.0], 2, 2.0)[0];
        assert!((m.nsd - 1.0).abs() < 1e-12);
        assert!((m.hd95 - 2.0).abs() < 1e-12, "the shift is along x, 2 mm");
    }

    #[test]
    fn disjoint_cubes_by_hand() {
        // 2^3 cubes (every voxel an edge voxel) 5 voxels apart along z: each voxel's nearest is 4
        // or 5 voxels away, four of each; the 95th percentile of [4,4,4,4,5,5,5,5] is 5.
        let dims = [4, 4, 10];
        let truth = cube(dims, [1, 1, 0], 2, 3);
        let pred = cube(dims, [1, 1, 5], 2, 3);
        let m = evaluate(&pred, &truth, dims, [0.8, 0.8, 2.5], 4, 10.0)[2];
        assert_eq!(m.label, 3);
        assert_eq!(m.dice, 0.0);
        assert!((m.hd95 - 12.5).abs() < 1e-12, "{}", m.hd95);
        assert!((m.nsd - 8.0 / 16.0).abs() < 1e-12, "within 10 mm: the 4-voxel (10 mm) distances");
        assert!(evaluate(&pred, &truth, dims, [0.8, 0.8, 2.5], 4, 9.9)[2].nsd == 0.0);
    }

    #[test]
    fn empty_masks_as_monai() {
        let dims = [4, 4, 4];
        let some = cube(dims, [1, 1, 1], 2, 1);
        let none = vec![0u8; 64];
        let both_empty = evaluate(&none, &none, dims, [1.0; 3], 2, 1.0)[0];
        assert!(both_empty.dice.is_nan() && both_empty.nsd.is_nan() && both_empty.hd95.is_nan());
        let missed = evaluate(&none, &some, dims, [1.0; 3], 2, 1.0)[0];
        assert_eq!((missed.dice, missed.nsd, missed.hd95), (0.0, 0.0, f64::INFINITY));
        let false_positive = evaluate(&some, &none, dims, [1.0; 3], 2, 1.0)[0];
        assert!(false_positive.dice.is_nan(), "ignore_empty: no truth, no Dice");
        assert_eq!((false_positive.nsd, false_positive.hd95), (0.0, f64::INFINITY));
        assert_eq!(mean_finite([0.5, f64::NAN, 1.0, f64::INFINITY]), 0.75);
        let json = serde_json::to_string(&false_positive).unwrap();
        assert!(json.contains("\"dice\":null") && json.contains("\"hd95\":null"), "{json}");
    }
}
