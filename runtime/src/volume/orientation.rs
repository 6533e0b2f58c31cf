//! Reorientation to RAS by axis permutation and flips only, as MONAI's `Orientation(axcodes="RAS")`
//! computes it from nibabel's `io_orientation`. No voxel is interpolated: an oblique affine keeps
//! its rotation, and the oriented grid is just another way of indexing the same voxels.

use super::affine::Affine;

/// How the RAS-oriented grid indexes the stored one: oriented axis `k` (R, A, S) is stored axis
/// `source_axis[k]`, reversed when `flip[k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orientation {
    pub source_axis: [usize; 3],
    pub flip: [bool; 3],
}

/// The orthogonal polar factor of a non-singular 3x3 matrix (the closest rotation or reflection),
/// by Newton's iteration `Q <- (Q + Q^-T) / 2`; equal to nibabel's `U V^T` from the SVD.
fn polar_factor(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut q = m;
    for _ in 0..100 {
        let a = Affine([
            [q[0][0], q[0][1], q[0][2], 0.0],
            [q[1][0], q[1][1], q[1][2], 0.0],
            [q[2][0], q[2][1], q[2][2], 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let Some(inv) = a.inverse() else { return q };
        let mut next = [[0.0; 3]; 3];
        let mut change: f64 = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                next[i][j] = 0.5 * (q[i][j] + inv.0[j][i]);
                change = change.max((next[i][j] - q[i][j]).abs());
            }
        }
        q = next;
        if change < 1e-15 {
            break;
        }
    }
    q
}

impl Orientation {
    /// nibabel's `io_orientation` of `affine`, then inverted into "which stored axis feeds each
    /// RAS axis". Columns are normalised, the closest orthogonal matrix taken, and each stored axis
    /// in turn assigned to the world axis it points along most, that world axis then being used up.
    pub fn to_ras(affine: &Affine) -> Orientation {
        let mut m = [[0.0; 3]; 3];
        let spacing = affine.spacing();
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = affine.0[i][j] / spacing[j];
            }
        }
        let mut r = polar_factor(m);
        let mut source_axis = [0; 3];
        let mut flip = [false; 3];
        for input_axis in 0..3 {
            let world =
                (0..3).max_by(|&a, &b| r[a][input_axis].abs().total_cmp(&r[b][input_axis].abs())).expect("three axes");
            source_axis[world] = input_axis;
            flip[world] = r[world][input_axis] < 0.0;
            r[world] = [0.0; 3];
        }
        Orientation { source_axis, flip }
    }

    /// The orientation onto `codes` (three of L/R, P/A, I/S, as nibabel and MONAI's
    /// `Orientation(axcodes=...)` take them: `LPS` makes oriented axis 0 run towards the patient's
    /// left): the RAS orientation, each axis reversed where its letter is L, P or I. `None` for
    /// codes that are not three distinct anatomical axes.
    pub fn to_codes(affine: &Affine, codes: &str) -> Option<Orientation> {
        let axes = prosam_models::format::metadata::parse_axis_codes(codes)?;
        let ras = Orientation::to_ras(affine);
        Some(Orientation {
            source_axis: axes.map(|(world, _)| ras.source_axis[world]),
            flip: axes.map(|(world, negative)| ras.flip[world] != negative),
        })
    }

    pub fn is_identity(&self) -> bool {
        self.source_axis == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Oriented grid size from the stored one.
    pub fn oriented_dims(&self, stored: [usize; 3]) -> [usize; 3] {
        self.source_axis.map(|a| stored[a])
    }

    /// The affine of the oriented grid: every voxel keeps its world position.
    pub fn oriented_affine(&self, stored_affine: &Affine, stored: [usize; 3]) -> Affine {
        // T maps oriented indices to stored ones.
        let mut t = [[0.0; 4]; 4];
        t[3][3] = 1.0;
        for k in 0..3 {
            let a = self.source_axis[k];
            if self.flip[k] {
                t[a][k] = -1.0;
                t[a][3] = (stored[a] - 1) as f64;
            } else {
                t[a][k] = 1.0;
            }
        }
        stored_affine.matmul(&Affine(t))
    }

    /// Offset of the oriented voxel (0, 0, 0) and signed strides along the oriented axes, for data
    /// stored with `stored_strides` (in elements).
    pub fn view(&self, stored: [usize; 3], stored_strides: [usize; 3]) -> (usize, [isize; 3]) {
        let mut base = 0usize;
        let mut strides = [0isize; 3];
        for k in 0..3 {
            let a = self.source_axis[k];
            if self.flip[k] {
                base += (stored[a] - 1) * stored_strides[a];
                strides[k] = -(stored_strides[a] as isize);
            } else {
                strides[k] = stored_strides[a] as isize;
            }
        }
        (base, strides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_aligned_permutations_and_flips() {
        // Stored axes: 0 -> Superior, 1 -> Left, 2 -> Anterior.
        let a = Affine::from_rows([[0.0, -0.7, 0.0, 5.0], [0.0, 0.0, 0.8, -3.0], [2.5, 0.0, 0.0, 1.0]]);
        let o = Orientation::to_ras(&a);
        assert_eq!(o, Orientation { source_axis: [1, 2, 0], flip: [true, false, false] });
        let stored = [10, 20, 30];
        assert_eq!(o.oriented_dims(stored), [20, 30, 10]);
        let oa = o.oriented_affine(&a, stored);
        // Oriented voxel (0, 0, 0) is stored voxel (0, 19, 0); both at the same world point.
        assert_eq!(oa.apply([0.0, 0.0, 0.0]), a.apply([0.0, 19.0, 0.0]));
        assert_eq!(oa.apply([3.0, 4.0, 5.0]), a.apply([5.0, 16.0, 4.0]));
        // RAS-oriented affine has a positive diagonal.
        assert!(oa.0[0][0] > 0.0 && oa.0[1][1] > 0.0 && oa.0[2][2] > 0.0);
        let (base, strides) = o.view(stored, [1, 10, 200]);
        assert_eq!(base as isize + 3 * strides[0] + 4 * strides[1] + 5 * strides[2], 5 + 16 * 10 + 4 * 200);
    }

    #[test]
    fn oblique_affine_picks_the_dominant_axes() {
        let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
        let a = Affine::from_rows([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]);
        assert_eq!(Orientation::to_ras(&a), Orientation { source_axis: [0, 1, 2], flip: [false, false, true] });
    }

    #[test]
    fn axis_codes_reverse_and_permute_the_ras_view() {
        // Stored RAS at 2 mm: LPS reverses the first two axes, SAR permutes them.
        let a = Affine::from_rows([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]);
        assert_eq!(Orientation::to_codes(&a, "RAS"), Some(Orientation::to_ras(&a)));
        assert_eq!(
            Orientation::to_codes(&a, "LPS"),
            Some(Orientation { source_axis: [0, 1, 2], flip: [true, true, false] })
        );
        assert_eq!(
            Orientation::to_codes(&a, "SAR"),
            Some(Orientation { source_axis: [2, 1, 0], flip: [false, false, false] })
        );
        for bad in ["RRS", "RA", "XYZ", "RASR"] {
            assert_eq!(Orientation::to_codes(&a, bad), None, "{bad}");
        }
    }
}
