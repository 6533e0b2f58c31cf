//! 4x4 voxel-to-world affines (RAS+ millimetres, as NIfTI and nibabel express them).

/// A row-major 4x4 affine whose last row is `0 0 0 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [[f64; 4]; 4]);

impl Affine {
    pub fn identity() -> Self {
        let mut m = [[0.0; 4]; 4];
        (0..4).for_each(|i| m[i][i] = 1.0);
        Affine(m)
    }

    /// From the three rows `[r0, r1, r2]` (NIfTI's `srow_x/y/z`).
    pub fn from_rows(rows: [[f64; 4]; 3]) -> Self {
        Affine([rows[0], rows[1], rows[2], [0.0, 0.0, 0.0, 1.0]])
    }

    pub fn matmul(&self, other: &Affine) -> Affine {
        let mut m = [[0.0; 4]; 4];
        for (i, row) in m.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..4).map(|k| self.0[i][k] * other.0[k][j]).sum();
            }
        }
        Affine(m)
    }

    /// Determinant of the 3x3 linear part.
    pub fn det3(&self) -> f64 {
        let m = &self.0;
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    }

    /// The inverse, or `None` when the linear part is singular or not finite.
    pub fn inverse(&self) -> Option<Affine> {
        let det = self.det3();
        if !det.is_finite() || det.abs() < 1e-12 {
            return None;
        }
        let m = &self.0;
        let mut inv = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                // Cofactor of (j, i) over the determinant.
                let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
                let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
                inv[i][j] = (m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / det;
            }
        }
        for i in 0..3 {
            inv[i][3] = -(0..3).map(|k| inv[i][k] * m[k][3]).sum::<f64>();
        }
        inv[3][3] = 1.0;
        Some(Affine(inv))
    }

    /// Voxel spacing: the length of each of the three columns.
    pub fn spacing(&self) -> [f64; 3] {
        [0, 1, 2].map(|j| (0..3).map(|i| self.0[i][j] * self.0[i][j]).sum::<f64>().sqrt())
    }

    /// World coordinates of a (continuous) voxel index.
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        [0, 1, 2].map(|i| self.0[i][0] * p[0] + self.0[i][1] * p[1] + self.0[i][2] * p[2] + self.0[i][3])
    }

    /// The same affine with column `j` scaled by `factors[j]` (a new voxel size along each axis).
    pub fn scale_columns(&self, factors: [f64; 3]) -> Affine {
        let mut m = self.0;
        for row in m.iter_mut().take(3) {
            for j in 0..3 {
                row[j] *= factors[j];
            }
        }
        Affine(m)
    }

    /// The same affine with world coordinates converted from DICOM's LPS to NIfTI's RAS (x and
    /// y negated).
    pub fn lps_to_ras(&self) -> Affine {
        let mut m = self.0;
        for row in m.iter_mut().take(2) {
            row.iter_mut().for_each(|v| *v = -*v);
        }
        Affine(m)
    }

    pub fn is_finite(&self) -> bool {
        self.0.iter().flatten().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_round_trips() {
        let a = Affine::from_rows([[0.0, -2.0, 0.1, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.3, 3.0, 7.0]]);
        let i = a.inverse().unwrap();
        let id = a.matmul(&i);
        for r in 0..4 {
            for c in 0..4 {
                assert!((id.0[r][c] - if r == c { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(
            Affine::from_rows([[1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]).inverse().is_none()
        );
    }
}
