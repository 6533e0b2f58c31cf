//! Packed bowel: the small bowel and colon that fill a real abdomen's free peritoneal space, as a
//! cellular (Worley) field. Space is cut into jittered cells about the size of a loop; most cells
//! are a loop (a lumen inside an enhancing wall, mesenteric fat between neighbours), the rest are
//! fat. Each loop's contents are drawn: fluid, oral contrast, gas, gas over fluid (a level), or
//! stool mottled with gas. Only the label-driven synthesis uses it: the drawn phantoms keep their
//! few loops so that a seed still gives the phantom it always did.

use crate::rng::Rng;

/// Loop contents, drawn per cell.
#[derive(Debug, Clone, Copy)]
enum Contents {
    Fluid(f64),
    Gas,
    /// Gas anterior of the level (mm above the cell's point), fluid below.
    Level(f64, f64),
    /// Stool: mottled gas and soft matter at a few mm scale.
    Stool,
}

/// One case's bowel.
#[derive(Debug, Clone)]
pub(super) struct PackedBowel {
    salt: u64,
    /// Cell size (mm): the loops' spacing.
    cell: f64,
    /// Fraction of cells that hold a loop.
    fill: f64,
    /// Fat between neighbouring loops and the wall's thickness (mm).
    gap: f64,
    wall: f64,
    wall_hu: f64,
    fluid_hu: f64,
    /// Oral contrast in this case: its HU.
    oral_contrast: Option<f64>,
    /// Loops lie anterior of this y (layout frame, mm): behind it is retroperitoneum.
    posterior_limit: f64,
}

fn hash(salt: u64, cell: [i64; 3]) -> Rng {
    let mut h = salt;
    for c in cell {
        h = (h ^ c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    Rng::new(h)
}

impl PackedBowel {
    /// A case's bowel, its wall near `wall_hu` (the contrast phase's bowel wall).
    pub(super) fn random(rng: &mut Rng, wall_hu: f64) -> Self {
        PackedBowel {
            salt: rng.next_u64(),
            cell: 22.0 + 12.0 * rng.uniform(),
            fill: 0.45 + 0.5 * rng.uniform(),
            gap: 0.8 + 2.0 * rng.uniform(),
            wall: 1.5 + 1.5 * rng.uniform(),
            wall_hu: wall_hu + 10.0 * rng.normal(),
            fluid_hu: 5.0 + 25.0 * rng.uniform(),
            oral_contrast: rng.chance(0.3).then(|| 150.0 + 250.0 * rng.uniform()),
            posterior_limit: -45.0 + 15.0 * rng.uniform(),
        }
    }

    /// HU at `q` (layout frame) inside the visceral cavity, `fat_hu` between loops; `None`
    /// behind the peritoneum.
    pub(super) fn value(&self, q: [f64; 3], fat_hu: f64) -> Option<f64> {
        if q[1] < self.posterior_limit {
            return None;
        }
        let base = q.map(|x| (x / self.cell).floor() as i64);
        // The nearest and second-nearest cell points: Voronoi cells, their border where the two
        // distances meet.
        // With the nearest point, its cell's stream after the point's draws: whether the cell is
        // a loop, and its contents.
        let (mut d1, mut d2) = (f64::MAX, f64::MAX);
        let (mut point, mut h) = ([0.0; 3], Rng::new(0));
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let c = [base[0] + dx, base[1] + dy, base[2] + dz];
                    let mut cell = hash(self.salt, c);
                    let p: [f64; 3] = std::array::from_fn(|a| (c[a] as f64 + 0.15 + 0.7 * cell.uniform()) * self.cell);
                    let d = (0..3).map(|a| (q[a] - p[a]).powi(2)).sum::<f64>().sqrt();
                    if d < d1 {
                        (d2, d1, point, h) = (d1, d, p, cell);
                    } else if d < d2 {
                        d2 = d;
                    }
                }
            }
        }
        if h.uniform() > self.fill {
            return Some(fat_hu + 10.0);
        }
        let to_border = (d2 - d1) / 2.0;
        if to_border < self.gap {
            return Some(fat_hu + 10.0);
        }
        if to_border < self.gap + self.wall {
            return Some(self.wall_hu);
        }
        let fluid = self.fluid_hu + 8.0 * h.normal();
        // Mostly fluid (or oral contrast where the case has it), as small bowel is; gas and stool
        // in a quarter of the loops, as colon.
        let u = h.uniform();
        let contents = match self.oral_contrast {
            _ if u < 0.05 => Contents::Gas,
            _ if u < 0.17 => Contents::Level(4.0 * h.normal(), fluid),
            _ if u < 0.25 => Contents::Stool,
            Some(hu) if h.chance(0.6) => Contents::Fluid(hu * (0.7 + 0.3 * h.uniform())),
            _ => Contents::Fluid(fluid),
        };
        Some(match contents {
            Contents::Fluid(hu) => hu,
            Contents::Gas => -950.0,
            Contents::Level(level, hu) => {
                if q[1] > point[1] + level {
                    -950.0
                } else {
                    hu
                }
            }
            Contents::Stool => {
                let mut m = hash(self.salt ^ 0x5354_4F4F_4C00_0000, q.map(|x| (x / 4.0).floor() as i64));
                if m.chance(0.35) { -900.0 + 100.0 * m.uniform() } else { -60.0 + 100.0 * m.uniform() }
            }
        })
    }
}
