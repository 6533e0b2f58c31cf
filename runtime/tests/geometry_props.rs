//! Property tests (proptest) for the geometry every segmentation rests on: affines composed and
//! inverted, reorientation to RAS and back, resampling, and sliding-window coverage, on random
//! shapes, spacings, axis orders and obliquities, each against a naive f64 statement of what
//! must hold.

use proptest::prelude::*;
use prosam_runtime::pipeline::sliding_window::Accumulator;
use prosam_runtime::pipeline::{Blend, WindowPlan};
use prosam_runtime::volume::resample::{labels_from_probabilities, resample_view, resampled_size};
use prosam_runtime::volume::{Affine, Orientation};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

/// A voxel-to-world affine as scanners write them: a permutation of the axes, flips, spacings of
/// 0.3 to 5 mm, a rotation of up to 25 degrees about each axis, and a translation.
fn scanner_affine() -> impl Strategy<Value = Affine> {
    (
        Just([0usize, 1, 2]).prop_shuffle(),
        prop::array::uniform3(any::<bool>()),
        prop::array::uniform3(0.3f64..5.0),
        prop::array::uniform3(-25f64..25.0),
        prop::array::uniform3(-300f64..300.0),
    )
        .prop_map(|(perm, flips, spacing, angles, shift)| {
            let [a, b, c] = angles.map(f64::to_radians);
            let rx = [[1.0, 0.0, 0.0], [0.0, a.cos(), -a.sin()], [0.0, a.sin(), a.cos()]];
            let ry = [[b.cos(), 0.0, b.sin()], [0.0, 1.0, 0.0], [-b.sin(), 0.0, b.cos()]];
            let rz = [[c.cos(), -c.sin(), 0.0], [c.sin(), c.cos(), 0.0], [0.0, 0.0, 1.0]];
            let mul = |p: [[f64; 3]; 3], q: [[f64; 3]; 3]| {
                std::array::from_fn::<_, 3, _>(|i| {
                    std::array::from_fn::<_, 3, _>(|j| (0..3).map(|k| p[i][k] * q[k][j]).sum())
                })
            };
            let r = mul(mul(rz, ry), rx);
            // Stored axis j runs along world axis perm[j] (flipped or not), then rotated.
            let mut rows = [[0.0; 4]; 3];
            for j in 0..3 {
                let sign = if flips[j] { -1.0 } else { 1.0 };
                for i in 0..3 {
                    rows[i][j] = r[i][perm[j]] * sign * spacing[j];
                }
            }
            for i in 0..3 {
                rows[i][3] = shift[i];
            }
            Affine::from_rows(rows)
        })
}

fn general_affine() -> impl Strategy<Value = Affine> {
    prop::array::uniform3(prop::array::uniform4(-5f64..5.0)).prop_map(Affine::from_rows)
}

/// Stored index of a flat offset into a first-axis-fastest volume.
fn unflatten(offset: usize, dims: [usize; 3]) -> [usize; 3] {
    [offset % dims[0], offset / dims[0] % dims[1], offset / (dims[0] * dims[1])]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn affines_invert_and_compose(a in general_affine(), b in general_affine(), p in prop::array::uniform3(-100f64..100.0)) {
        // Well-conditioned ones only: the property is about the algebra, not about rounding.
        let norm = |m: &Affine| (0..3).map(|j| (0..3).map(|i| m.0[i][j] * m.0[i][j]).sum::<f64>().sqrt()).product::<f64>();
        prop_assume!(a.det3().abs() > 0.05 * norm(&a) && b.det3().abs() > 0.05 * norm(&b));
        let (ai, bi) = (a.inverse().unwrap(), b.inverse().unwrap());
        for (m, mi) in [(&a, &ai), (&b, &bi)] {
            let (left, right) = (m.matmul(mi), mi.matmul(m));
            for i in 0..4 {
                for j in 0..4 {
                    let want = if i == j { 1.0 } else { 0.0 };
                    prop_assert!(close(left.0[i][j], want, 1e-9) && close(right.0[i][j], want, 1e-9));
                }
            }
        }
        // (A B)^-1 = B^-1 A^-1, and points map there and back.
        let abi = a.matmul(&b).inverse().unwrap();
        let bia = bi.matmul(&ai);
        for i in 0..4 {
            for j in 0..4 {
                prop_assert!(close(abi.0[i][j], bia.0[i][j], 1e-8));
            }
        }
        let back = ai.apply(a.apply(p));
        prop_assert!((0..3).all(|k| close(back[k], p[k], 1e-9)));
        let there = a.matmul(&b).apply(p);
        let stepwise = a.apply(b.apply(p));
        prop_assert!((0..3).all(|k| close(there[k], stepwise[k], 1e-9)));
        prop_assert_eq!(a.lps_to_ras().lps_to_ras(), a);
    }

    #[test]
    fn reorientation_keeps_every_voxel_in_place(a in scanner_affine(), dims in prop::array::uniform3(1usize..7)) {
        let o = Orientation::to_ras(&a);
        let oriented_dims = o.oriented_dims(dims);
        let oa = o.oriented_affine(&a, dims);
        // RAS: each oriented axis runs mostly along +world axis k.
        for k in 0..3 {
            let column = [oa.0[0][k], oa.0[1][k], oa.0[2][k]];
            let dominant = (0..3).max_by(|&x, &y| column[x].abs().total_cmp(&column[y].abs())).unwrap();
            prop_assert_eq!(dominant, k);
            prop_assert!(column[k] > 0.0);
        }
        prop_assert!(Orientation::to_ras(&oa).is_identity(), "the oriented grid is not RAS: {:?}", Orientation::to_ras(&oa));
        // Every oriented voxel is a stored voxel at the same world point, each stored one once.
        let (base, strides) = o.view(dims, [1, dims[0], dims[0] * dims[1]]);
        let mut seen = vec![false; dims.iter().product()];
        for i in 0..oriented_dims[0] {
            for j in 0..oriented_dims[1] {
                for k in 0..oriented_dims[2] {
                    let offset = base as isize + i as isize * strides[0] + j as isize * strides[1] + k as isize * strides[2];
                    prop_assert!(offset >= 0 && (offset as usize) < seen.len());
                    let stored = unflatten(offset as usize, dims);
                    prop_assert!(!seen[offset as usize]);
                    seen[offset as usize] = true;
                    let w1 = oa.apply([i as f64, j as f64, k as f64]);
                    let w0 = a.apply(stored.map(|v| v as f64));
                    prop_assert!((0..3).all(|d| close(w1[d], w0[d], 1e-9)), "{:?} vs {:?}", w1, w0);
                }
            }
        }
    }

    #[test]
    fn labels_survive_reorientation_and_restore(a in scanner_affine(), dims in prop::array::uniform3(1usize..7), seed in any::<u64>()) {
        // Labels on the stored grid -> the oriented view (as the network sees them, one-hot at
        // the CT's own spacing) -> labels_from_probabilities writing back through the view.
        let classes = 4;
        let n: usize = dims.iter().product();
        let stored: Vec<u8> = (0..n).map(|v| ((seed.wrapping_mul(v as u64 + 1) >> 17) % classes as u64) as u8).collect();
        let o = Orientation::to_ras(&a);
        let od = o.oriented_dims(dims);
        let (base, strides) = o.view(dims, [1, dims[0], dims[0] * dims[1]]);
        let mut probs = vec![0f32; classes * n];
        for i in 0..od[0] {
            for j in 0..od[1] {
                for k in 0..od[2] {
                    let offset = (base as isize + i as isize * strides[0] + j as isize * strides[1] + k as isize * strides[2]) as usize;
                    probs[stored[offset] as usize * n + (i * od[1] + j) * od[2] + k] = 1.0;
                }
            }
        }
        let mut restored = vec![255u8; n];
        labels_from_probabilities(&probs, classes, od, od, [1.0; 3], &mut restored, base, strides);
        prop_assert_eq!(restored, stored);
    }

    #[test]
    fn resampling_is_exact_on_linear_fields(
        dims in prop::array::uniform3(2usize..9),
        old in prop::array::uniform3(0.5f64..4.0),
        new in prop::array::uniform3(0.5f64..4.0),
        coef in prop::array::uniform4(-3f64..3.0),
    ) {
        let field = |p: [f64; 3]| coef[0] * p[0] + coef[1] * p[1] + coef[2] * p[2] + coef[3];
        // C order (last axis fastest), as the pipeline's oriented view hands it over.
        let data: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|v| field([(v / (dims[1] * dims[2])) as f64, (v / dims[2] % dims[1]) as f64, (v % dims[2]) as f64]) as f32)
            .collect();
        let strides = [(dims[1] * dims[2]) as isize, dims[2] as isize, 1];
        let out_dims = [0, 1, 2].map(|a| resampled_size(dims[a], old[a], new[a]));
        let ratio = [0, 1, 2].map(|a| new[a] / old[a]);
        let out = resample_view(&data, 0, strides, dims, out_dims, ratio);
        for (v, &got) in out.iter().enumerate() {
            let idx = [v / (out_dims[1] * out_dims[2]), v / out_dims[2] % out_dims[1], v % out_dims[2]];
            // Border padding: the input coordinate is clamped into the grid.
            let x = [0, 1, 2].map(|a| (idx[a] as f64 * ratio[a]).clamp(0.0, (dims[a] - 1) as f64));
            prop_assert!((got as f64 - field(x)).abs() < 1e-4 * (1.0 + field(x).abs()), "{} vs {}", got, field(x));
        }
        // The model grid spans the same extent, to within half a new voxel (MONAI's rounding).
        for a in 0..3 {
            let extent_old = (dims[a] - 1) as f64 * old[a];
            let extent_new = (out_dims[a] - 1) as f64 * new[a];
            prop_assert!((extent_old - extent_new).abs() <= 0.5 * new[a] + 1e-9);
        }
        // Same spacing: the identity.
        let same = resample_view(&data, 0, strides, dims, dims, [1.0; 3]);
        prop_assert_eq!(same, data);
    }

    #[test]
    fn sliding_windows_cover_every_voxel_and_weights_normalise(
        size in prop::array::uniform3(1usize..40),
        roi in prop::array::uniform3(1usize..17),
        overlap in prop_oneof![Just(0.0), Just(0.25), Just(0.5), Just(0.75), 0.0f64..0.9],
        gaussian in any::<bool>(),
    ) {
        let plan = WindowPlan::new(size, roi, overlap);
        let working = plan.working;
        for a in 0..3 {
            prop_assert_eq!(working[a], size[a].max(roi[a]));
            prop_assert_eq!(plan.pad_before[a], (working[a] - size[a]) / 2);
        }
        // Every window inside the working volume, every voxel in at least one.
        let mut covered = vec![0u32; working.iter().product()];
        for s in &plan.starts {
            for a in 0..3 {
                prop_assert!(s[a] + roi[a] <= working[a]);
            }
            for i in s[0]..s[0] + roi[0] {
                for j in s[1]..s[1] + roi[1] {
                    for k in s[2]..s[2] + roi[2] {
                        covered[(i * working[1] + j) * working[2] + k] += 1;
                    }
                }
            }
        }
        prop_assert!(covered.iter().all(|&c| c > 0), "a voxel no window covers");
        // MONAI's scan: per axis, starts every interval, the last moved back to end at the edge.
        for a in 0..3 {
            let mut starts: Vec<usize> = plan.starts.iter().map(|s| s[a]).collect();
            starts.sort();
            starts.dedup();
            let interval = if roi[a] == working[a] { roi[a] } else { ((roi[a] as f64 * (1.0 - overlap)) as usize).max(1) };
            prop_assert_eq!(starts[0], 0);
            prop_assert_eq!(*starts.last().unwrap() + roi[a], working[a]);
            for w in starts.windows(2) {
                prop_assert!(w[1] - w[0] <= interval);
            }
        }
        // Weighted averaging of constant logits gives back the constant everywhere: the weights
        // of every voxel sum to what MONAI divides by.
        let blend = if gaussian { Blend::Gaussian } else { Blend::Constant };
        let roi_len: usize = roi.iter().product();
        let mut acc = Accumulator::new(plan.clone(), 2, blend);
        let logits: Vec<f32> = std::iter::repeat_n(1.5f32, roi_len).chain(std::iter::repeat_n(-2.0, roi_len)).collect();
        let mut planes = Vec::new();
        let mut take = |x: usize, values: Vec<f32>| planes.push((x, values));
        for _ in &plan.starts {
            acc.add(&logits, &mut take);
        }
        acc.finish(&mut take);
        let plane_len = size[1] * size[2];
        prop_assert_eq!(planes.iter().map(|p| p.0).collect::<Vec<_>>(), (0..size[0]).collect::<Vec<_>>());
        for (_, values) in &planes {
            prop_assert_eq!(values.len(), 2 * plane_len);
            prop_assert!(values[..plane_len].iter().all(|&v| (v - 1.5).abs() < 1e-4));
            prop_assert!(values[plane_len..].iter().all(|&v| (v + 2.0).abs() < 1e-4));
        }
    }
}
