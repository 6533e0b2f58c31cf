//! Synthetic abdominal CT phantoms with their BTCV label maps, for tests, demos and training
//! experiments: unlimited labelled data that is free to ship. They are synthetic: simple shapes
//! with CT-like intensities, not anatomy; a model trained only on them is a demonstration.
//!
//! A phantom is a body (subcutaneous fat, an abdominal wall of muscle, visceral fat) in air, with a
//! spine (vertebral bodies, discs, the canal, posterior arch), paraspinal and psoas muscles, ribs
//! in the upper half, unlabelled bowel loops with air, and the 13 BTCV organs as smoothly deformed
//! ellipsoids and tubes at their usual places and sizes (liver about 1.5 L, spleen about 0.2 L,
//! adrenals a few mL). Intensities follow a contrast phase drawn per case (none, arterial or
//! portal venous) with per-case variation, so that liver, spleen, pancreas and stomach wall lie
//! within about 30 HU of each other, as in real CT. The image is blurred by about half a voxel
//! (partial volume), gets a smooth texture per tissue and Gaussian noise, and is stored at a
//! random spacing and axis orientation (see [`PhantomOptions`]).

mod bowel;
mod real;

pub use real::{LabelAnatomy, generate_from};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use crate::rng::Rng;
use crate::volume::{Affine, Volume};
use crate::{Error, Result};

/// The BTCV label numbers the phantoms use (`prosam_models::format::BTCV_LABELS`).
pub mod label {
    pub const SPLEEN: u8 = 1;
    pub const RIGHT_KIDNEY: u8 = 2;
    pub const LEFT_KIDNEY: u8 = 3;
    pub const GALLBLADDER: u8 = 4;
    pub const ESOPHAGUS: u8 = 5;
    pub const LIVER: u8 = 6;
    pub const STOMACH: u8 = 7;
    pub const AORTA: u8 = 8;
    pub const IVC: u8 = 9;
    pub const PORTAL_SPLENIC_VEIN: u8 = 10;
    pub const PANCREAS: u8 = 11;
    pub const RIGHT_ADRENAL: u8 = 12;
    pub const LEFT_ADRENAL: u8 = 13;
}

/// The grid a phantom is stored on, and the label-driven synthesis's bowel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhantomOptions {
    /// In-plane voxel size range in mm (drawn per case).
    pub in_plane_mm: (f64, f64),
    /// Slice spacing range in mm.
    pub slice_mm: (f64, f64),
    /// Store with random axis flips (`RAS`, `LPS`, `LAS`, ... and head-first or feet-first), as
    /// scanners and converters do; otherwise RAS.
    pub random_orientation: bool,
    /// Field of view in mm (left-right, anterior-posterior, cranio-caudal).
    pub field_of_view_mm: [f64; 3],
    /// The bowel of the label-driven synthesis ([`generate_from`]); the drawn phantoms always
    /// have their few loops.
    pub bowel: Bowel,
    /// Share of the label-driven cases whose scan is a thin slab (40-100 mm) through the organs,
    /// as a partial series or a limited scan range gives: thinner than a network's window, so
    /// training sees the padding inference adds.
    pub thin_fov: f64,
}

/// How the label-driven synthesis fills the free peritoneal space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Bowel {
    /// Small bowel and colon packed around the organs, as in a real abdomen: loops with walls,
    /// fluid, oral contrast, gas, gas-fluid levels or stool, mesenteric fat between them.
    #[default]
    Packed,
    /// A few loops low in the abdomen in visceral fat, as the drawn phantoms have (the data the
    /// first CT-trained student saw).
    Loops,
}

impl Default for PhantomOptions {
    fn default() -> Self {
        Self {
            in_plane_mm: (1.0, 1.6),
            slice_mm: (2.0, 3.5),
            random_orientation: true,
            field_of_view_mm: [380.0, 300.0, 250.0],
            bowel: Bowel::default(),
            thin_fov: 0.2,
        }
    }
}

/// A phantom: the CT in HU and its labels on the same grid.
#[derive(Debug, Clone)]
pub struct Phantom {
    pub image: Volume,
    pub labels: Vec<u8>,
    /// `none`, `arterial` or `portal_venous`.
    pub phase: &'static str,
}

/// Makes the phantom of `seed`; the same seed and options give the same phantom on any machine
/// and thread count.
pub fn generate(seed: u64, options: &PhantomOptions) -> Phantom {
    let mut rng = Rng::new(seed ^ 0x5048_414E_544F_4D00);
    let anatomy = Anatomy::random(&mut rng);
    let scan =
        Scan { field_of_view_mm: options.field_of_view_mm, center_mm: [0.0; 3], blur: 0.45, noise_hu: (6.0, 22.0) };
    render(&anatomy, &mut rng, options, &scan)
}

/// Where and how an anatomy is scanned: the field of view (mm, centred on `center_mm` in the
/// scanner's RAS frame), the blur in voxels (partial volume), the range of the noise's standard
/// deviation in HU.
struct Scan {
    field_of_view_mm: [f64; 3],
    center_mm: [f64; 3],
    blur: f64,
    noise_hu: (f64, f64),
}

/// The CT and labels of `anatomy` on a grid drawn from `options` (spacing, axis flips) and `scan`.
fn render(anatomy: &Anatomy, rng: &mut Rng, options: &PhantomOptions, scan: &Scan) -> Phantom {
    let span = |r: (f64, f64), rng: &mut Rng| r.0 + (r.1 - r.0) * rng.uniform();
    let in_plane = span(options.in_plane_mm, rng);
    let spacing = [in_plane, in_plane, span(options.slice_mm, rng)];
    let fov = scan.field_of_view_mm;
    let dims: [usize; 3] = std::array::from_fn(|a| (fov[a] / spacing[a]).round().max(1.0) as usize);
    let flips: [bool; 3] =
        if options.random_orientation { [rng.chance(0.5), rng.chance(0.5), rng.chance(0.2)] } else { [false; 3] };
    // Voxel (i, j, k) to RAS mm, the grid centred on the scan's centre, each axis possibly reversed.
    let mut rows = [[0.0; 4]; 3];
    for a in 0..3 {
        let sign = if flips[a] { -1.0 } else { 1.0 };
        rows[a][a] = sign * spacing[a];
        rows[a][3] = scan.center_mm[a] - sign * spacing[a] * (dims[a] as f64 - 1.0) / 2.0;
    }
    let affine = Affine::from_rows(rows);
    let noise_sigma = span(scan.noise_hu, rng);
    let noise_seed = rng.next_u64();

    let plane = dims[0] * dims[1];
    let mut hu = vec![0f32; plane * dims[2]];
    let mut labels = vec![0u8; plane * dims[2]];
    hu.par_chunks_mut(plane).zip(labels.par_chunks_mut(plane)).enumerate().for_each(|(k, (hu, labels))| {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let p = affine.apply([i as f64, j as f64, k as f64]);
                let (value, label) = anatomy.sample(p);
                hu[i + dims[0] * j] = value as f32;
                labels[i + dims[0] * j] = label;
            }
        }
    });
    blur(&mut hu, dims, scan.blur);
    hu.par_chunks_mut(plane).enumerate().for_each(|(k, slice)| {
        let mut rng = Rng::new(noise_seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for v in slice {
            *v = (*v + (noise_sigma * rng.normal()) as f32).round().clamp(-1024.0, 3071.0);
        }
    });
    Phantom { image: Volume { dims, data: hu, affine }, labels, phase: anatomy.phase }
}

/// A separable Gaussian of `sigma` voxels along each axis (edges clamped).
fn blur(data: &mut [f32], dims: [usize; 3], sigma: f64) {
    let radius = (3.0 * sigma).ceil() as isize;
    let weights: Vec<f32> =
        (-radius..=radius).map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    let strides = [1, dims[0], dims[0] * dims[1]];
    for axis in 0..3 {
        let n = dims[axis] as isize;
        let source = data.to_vec();
        let plane = dims[0] * dims[1];
        data.par_chunks_mut(plane).enumerate().for_each(|(k, out)| {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let at = [i, j, k];
                    let base = i + strides[1] * j + strides[2] * k - at[axis] * strides[axis];
                    let x = at[axis] as isize;
                    let mut acc = 0.0;
                    for (w, d) in weights.iter().zip(-radius..=radius) {
                        let y = (x + d).clamp(0, n - 1) as usize;
                        acc += w * source[base + y * strides[axis]];
                    }
                    out[i + dims[0] * j] = acc;
                }
            }
        });
    }
}

/// A smooth random field: a few plane waves, about `wavelength` mm long, amplitude `amplitude`.
#[derive(Debug, Clone)]
struct Waves(Vec<([f64; 3], f64, f64)>);

impl Waves {
    fn random(rng: &mut Rng, count: usize, wavelength: f64, amplitude: f64) -> Self {
        Waves(
            (0..count)
                .map(|_| {
                    let dir = unit(rng);
                    let k = 2.0 * std::f64::consts::PI / (wavelength * (0.7 + 0.6 * rng.uniform()));
                    let a = amplitude * (0.5 + rng.uniform()) / (count as f64).sqrt();
                    (dir.map(|d| d * k), a, 2.0 * std::f64::consts::PI * rng.uniform())
                })
                .collect(),
        )
    }

    fn at(&self, p: [f64; 3]) -> f64 {
        self.0.iter().map(|(k, a, phase)| a * (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + phase).sin()).sum()
    }
}

fn unit(rng: &mut Rng) -> [f64; 3] {
    loop {
        let v = [rng.normal(), rng.normal(), rng.normal()];
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        if n > 1e-6 {
            return v.map(|x| x / n);
        }
    }
}

/// Rotation by small random angles (degrees, at most `max_deg` about each axis).
fn random_rotation(rng: &mut Rng, max_deg: f64) -> [[f64; 3]; 3] {
    let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for axis in 0..3 {
        let t = (rng.uniform() * 2.0 - 1.0) * max_deg.to_radians();
        let (c, s) = (t.cos(), t.sin());
        let (a, b) = ((axis + 1) % 3, (axis + 2) % 3);
        let mut g = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        g[a][a] = c;
        g[a][b] = -s;
        g[b][a] = s;
        g[b][b] = c;
        r = std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|m| g[i][m] * r[m][j]).sum()));
    }
    r
}

/// A region of space: a deformed ellipsoid or a tube along a polyline.
#[derive(Debug, Clone)]
enum Shape {
    Blob { center: [f64; 3], radii: [f64; 3], rotation: [[f64; 3]; 3], bumps: Waves },
    Tube { points: Vec<[f64; 3]>, radii: Vec<f64> },
}

impl Shape {
    fn blob(rng: &mut Rng, center: [f64; 3], radii: [f64; 3], tilt_deg: f64, roughness: f64) -> Shape {
        let jitter = |v: f64, rng: &mut Rng| v * (0.9 + 0.2 * rng.uniform());
        Shape::Blob {
            center: std::array::from_fn(|a| center[a] + 6.0 * rng.normal()),
            radii: radii.map(|r| jitter(r, rng)),
            rotation: random_rotation(rng, tilt_deg),
            bumps: Waves::random(rng, 4, 3.5, roughness),
        }
    }

    fn tube(rng: &mut Rng, points: &[[f64; 3]], radii: &[f64]) -> Shape {
        let shift = [3.0 * rng.normal(), 3.0 * rng.normal(), 3.0 * rng.normal()];
        Shape::Tube {
            points: points.iter().map(|p| std::array::from_fn(|a| p[a] + shift[a] + 2.0 * rng.normal())).collect(),
            radii: radii.iter().map(|r| r * (0.85 + 0.3 * rng.uniform())).collect(),
        }
    }

    /// How far inside the shape `p` lies, as a fraction of its local radius: > 0 inside, 1 on the
    /// axis or at the centre.
    fn depth(&self, p: [f64; 3]) -> f64 {
        match self {
            Shape::Blob { center, radii, rotation, bumps } => {
                let d = [p[0] - center[0], p[1] - center[1], p[2] - center[2]];
                let q: [f64; 3] = std::array::from_fn(|a| {
                    (rotation[0][a] * d[0] + rotation[1][a] * d[1] + rotation[2][a] * d[2]) / radii[a]
                });
                let r = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt();
                let limit = 1.0 + bumps.at(q);
                1.0 - r / limit
            }
            Shape::Tube { points, radii } => {
                let mut best = f64::NEG_INFINITY;
                for s in 0..points.len() - 1 {
                    let (a, b) = (points[s], points[s + 1]);
                    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
                    let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
                    let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
                    let t = ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / len2).clamp(0.0, 1.0);
                    let c = [ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2]];
                    let dist = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
                    let radius = radii[s] + t * (radii[s + 1] - radii[s]);
                    best = best.max(1.0 - dist / radius);
                }
                best
            }
        }
    }

    /// A box that holds the shape.
    fn bounds(&self) -> ([f64; 3], [f64; 3]) {
        match self {
            Shape::Blob { center, radii, bumps, .. } => {
                let grow = 1.0 + bumps.0.iter().map(|(_, a, _)| a.abs()).sum::<f64>();
                let r = radii.iter().fold(0.0f64, |m, &v| m.max(v)) * grow;
                (center.map(|c| c - r), center.map(|c| c + r))
            }
            Shape::Tube { points, radii } => {
                let r = radii.iter().fold(0.0f64, |m, &v| m.max(v));
                let mut lo = [f64::INFINITY; 3];
                let mut hi = [f64::NEG_INFINITY; 3];
                for p in points {
                    for a in 0..3 {
                        lo[a] = lo[a].min(p[a] - r);
                        hi[a] = hi[a].max(p[a] + r);
                    }
                }
                (lo, hi)
            }
        }
    }
}

/// What a region is made of: a value in HU by depth (outer shell, then inside), a texture, and the
/// label it carries.
#[derive(Debug, Clone)]
struct Tissue {
    shape: Shape,
    bounds: ([f64; 3], [f64; 3]),
    label: u8,
    /// HU in the shell `depth < shell` and inside it.
    shell_hu: f64,
    inner_hu: f64,
    shell: f64,
    /// Air above this anterior coordinate (mm), inside the shell: a gas bubble in a lumen.
    air_above: Option<f64>,
    texture: Waves,
}

impl Tissue {
    fn new(shape: Shape, label: u8, hu: f64, rng: &mut Rng) -> Tissue {
        Tissue::layered(shape, label, hu, hu, 0.0, rng)
    }

    fn layered(shape: Shape, label: u8, shell_hu: f64, inner_hu: f64, shell: f64, rng: &mut Rng) -> Tissue {
        let bounds = shape.bounds();
        Tissue {
            shape,
            bounds,
            label,
            shell_hu,
            inner_hu,
            shell,
            air_above: None,
            texture: Waves::random(rng, 3, 30.0, 6.0),
        }
    }

    fn value(&self, p: [f64; 3]) -> Option<f64> {
        let (lo, hi) = &self.bounds;
        if (0..3).any(|a| p[a] < lo[a] || p[a] > hi[a]) {
            return None;
        }
        let depth = self.shape.depth(p);
        if depth <= 0.0 {
            return None;
        }
        if depth < self.shell {
            return Some(self.shell_hu + self.texture.at(p));
        }
        if self.air_above.is_some_and(|y| p[1] > y) {
            return Some(-990.0);
        }
        Some(self.inner_hu + self.texture.at(p))
    }
}

/// One patient: the body's outline and the tissues in painting order (a later one covers an
/// earlier one).
struct Anatomy {
    /// Body semi-axes (mm, left-right and anterior-posterior) and the fat and muscle thicknesses.
    body: [f64; 2],
    fat: f64,
    muscle: f64,
    /// The body's outline wobble with height.
    outline: Waves,
    /// The patient's pose: a small rotation and shift of all anatomy.
    pose: [[f64; 3]; 3],
    shift: [f64; 3],
    fat_hu: f64,
    muscle_hu: f64,
    tissues: Vec<Tissue>,
    phase: &'static str,
    /// Organs from a real label map, in place of the drawn ones (label-driven synthesis).
    real: Option<real::RealOrgans>,
    /// Bowel packed into the visceral cavity (label-driven synthesis with [`Bowel::Packed`]).
    bowel: Option<bowel::PackedBowel>,
}

/// A contrast phase's organ values in HU, with per-case jitter.
#[derive(Debug, Clone, Copy)]
struct Contrast {
    phase: &'static str,
    liver: f64,
    spleen: f64,
    pancreas: f64,
    kidney: f64,
    aorta: f64,
    veins: f64,
    /// The stomach's and bowel's wall.
    wall: f64,
}

impl Contrast {
    fn random(rng: &mut Rng) -> Contrast {
        let n = |rng: &mut Rng, sd: f64| sd * rng.normal();
        // Contrast phase: organ enhancement in HU before per-case jitter.
        let (phase, liver, spleen, pancreas, kidney, aorta, veins, wall) = match rng.below(10) {
            0 | 1 => ("none", 58.0, 48.0, 42.0, 32.0, 42.0, 42.0, 42.0),
            2 | 3 => ("arterial", 72.0, 95.0, 98.0, 190.0, 290.0, 90.0, 80.0),
            _ => ("portal_venous", 108.0, 118.0, 95.0, 175.0, 165.0, 160.0, 92.0),
        };
        let (liver, spleen, pancreas, wall) =
            (liver + n(rng, 8.0), spleen + n(rng, 8.0), pancreas + n(rng, 6.0), wall + n(rng, 6.0));
        let (kidney, aorta, veins) = (kidney + n(rng, 15.0), aorta + n(rng, 25.0), veins + n(rng, 15.0));
        Contrast { phase, liver, spleen, pancreas, kidney, aorta, veins, wall }
    }
}

impl Anatomy {
    fn random(rng: &mut Rng) -> Anatomy {
        use label::*;
        let size = 0.88 + 0.22 * rng.uniform();
        let body = [160.0 * size * (0.95 + 0.1 * rng.uniform()), 115.0 * size * (0.92 + 0.16 * rng.uniform())];
        let s = |x: f64, y: f64, z: f64| [x * size, y * size, z];
        let n = |rng: &mut Rng, sd: f64| sd * rng.normal();
        let Contrast { phase, liver, spleen, pancreas, kidney, aorta, veins, wall } = Contrast::random(rng);
        let mut tissues = Vec::new();
        add_skeleton_and_gut(rng, size, false, &mut tissues);
        let mut add = |t: Tissue| tissues.push(t);
        // The organs.
        add(Tissue::new(Shape::blob(rng, s(-62.0, 5.0, 45.0), [82.0, 76.0, 63.0], 8.0, 0.12), LIVER, liver, rng));
        add(Tissue::new(Shape::blob(rng, s(10.0, 38.0, 62.0), [45.0, 28.0, 28.0], 10.0, 0.1), LIVER, liver, rng));
        add(Tissue::new(Shape::blob(rng, s(92.0, -45.0, 50.0), [26.0, 44.0, 48.0], 15.0, 0.12), SPLEEN, spleen, rng));
        for (x, z, label) in [(-70.0, -8.0, RIGHT_KIDNEY), (72.0, 2.0, LEFT_KIDNEY)] {
            add(Tissue::layered(
                Shape::blob(rng, s(x, -38.0, z), [26.0, 24.0, 52.0], 12.0, 0.08),
                label,
                kidney,
                kidney - 0.3 * (kidney - 30.0) - 10.0 * rng.uniform(),
                0.3,
                rng,
            ));
        }
        let mut stomach = Tissue::layered(
            Shape::blob(rng, s(52.0, 18.0, 52.0), [38.0, 32.0, 52.0], 20.0, 0.12),
            STOMACH,
            wall,
            10.0 + 20.0 * rng.uniform(),
            0.18,
            rng,
        );
        if rng.chance(0.7) {
            stomach.air_above = Some(s(0.0, 28.0 + n(rng, 6.0), 0.0)[1]);
        }
        add(stomach);
        add(Tissue::new(
            Shape::tube(
                rng,
                &[s(-28.0, 2.0, 2.0), s(2.0, -6.0, 12.0), s(42.0, -16.0, 22.0), s(78.0, -32.0, 32.0)],
                &[15.0, 12.0, 10.0, 8.0],
            ),
            PANCREAS,
            pancreas,
            rng,
        ));
        add(Tissue::new(
            Shape::blob(rng, s(-50.0, 40.0, 20.0), [15.0, 15.0, 33.0], 25.0, 0.08),
            GALLBLADDER,
            10.0 + n(rng, 6.0),
            rng,
        ));
        let adrenal = 35.0 + 0.2 * (liver - 60.0) + n(rng, 6.0);
        add(Tissue::new(
            Shape::blob(rng, s(-46.0, -30.0, 44.0), [6.0, 13.0, 18.0], 20.0, 0.1),
            RIGHT_ADRENAL,
            adrenal,
            rng,
        ));
        add(Tissue::new(
            Shape::blob(rng, s(40.0, -32.0, 32.0), [6.0, 13.0, 18.0], 20.0, 0.1),
            LEFT_ADRENAL,
            adrenal,
            rng,
        ));
        let mut esophagus = Tissue::layered(
            // In front of the aorta and left of the midline down to the hiatus, then to the cardia.
            Shape::tube(rng, &[s(6.0, -19.0, 140.0), s(14.0, -16.0, 100.0), s(30.0, -8.0, 82.0)], &[9.0, 9.0, 10.0]),
            ESOPHAGUS,
            45.0,
            rng.uniform() * 40.0,
            0.5,
            rng,
        );
        if rng.chance(0.4) {
            esophagus.inner_hu = -900.0;
        }
        add(esophagus);
        add(Tissue::new(
            Shape::tube(rng, &[s(-24.0, -30.0, 140.0), s(-25.0, -32.0, -140.0)], &[12.0, 11.0]),
            IVC,
            veins - 10.0,
            rng,
        ));
        add(Tissue::new(
            Shape::tube(rng, &[s(8.0, -40.0, 140.0), s(9.0, -38.0, 0.0), s(6.0, -34.0, -140.0)], &[12.0, 11.5, 10.5]),
            AORTA,
            aorta,
            rng,
        ));
        add(Tissue::new(
            Shape::tube(
                rng,
                &[s(-42.0, 6.0, 42.0), s(-12.0, -6.0, 16.0), s(38.0, -18.0, 22.0), s(84.0, -36.0, 36.0)],
                &[7.0, 7.0, 4.5, 4.5],
            ),
            PORTAL_SPLENIC_VEIN,
            veins,
            rng,
        ));
        add_ribs(rng, body, &mut tissues);
        let pose = random_rotation(rng, 4.0);
        let shift = [n(rng, 6.0), n(rng, 6.0), n(rng, 12.0)];
        Anatomy {
            body,
            fat: 10.0 + 25.0 * rng.uniform(),
            muscle: 8.0 + 6.0 * rng.uniform(),
            outline: Waves::random(rng, 3, 120.0, 0.04),
            pose,
            shift,
            fat_hu: -105.0 + n(rng, 8.0),
            muscle_hu: 50.0 + n(rng, 6.0),
            tissues,
            phase,
            real: None,
            bowel: None,
        }
    }

    /// HU and label at the scanner position `p` (RAS mm). The anatomy is laid out with +x toward
    /// the patient's left (the liver at -x, the spleen at +x); RAS's +x points to the patient's
    /// right, hence the mirrored first coordinate.
    fn sample(&self, p: [f64; 3]) -> (f64, u8) {
        let d = [self.shift[0] - p[0], p[1] - self.shift[1], p[2] - self.shift[2]];
        let q: [f64; 3] =
            std::array::from_fn(|a| self.pose[0][a] * d[0] + self.pose[1][a] * d[1] + self.pose[2][a] * d[2]);
        // Elliptical body: 1 at the skin, 0 at the centre.
        let scale = 1.0 + self.outline.at(q);
        let r = ((q[0] / self.body[0]).powi(2) + (q[1] / self.body[1]).powi(2)).sqrt() / scale;
        if r >= 1.0 {
            return (-1000.0, 0);
        }
        let inward = (1.0 - r) * self.body[1]; // mm inside the skin, roughly
        let mut value = if inward < self.fat {
            self.fat_hu
        } else if inward < self.fat + self.muscle {
            self.muscle_hu
        } else {
            match &self.bowel {
                // The peritoneum a few mm inside the wall.
                Some(bowel) if inward > self.fat + self.muscle + 3.0 => {
                    bowel.value(q, self.fat_hu).unwrap_or(self.fat_hu + 10.0)
                }
                _ => self.fat_hu + 10.0,
            }
        };
        if let Some(real) = &self.real
            && inward > self.fat + self.muscle + 6.0
            && let Some(v) = real.above_diaphragm(q)
        {
            value = v;
        }
        let mut label = 0;
        for t in &self.tissues {
            if let Some(v) = t.value(q) {
                value = v;
                label = t.label;
            }
        }
        if let Some((v, l)) = self.real.as_ref().and_then(|real| real.organ(q)) {
            value = v;
            label = l;
        }
        (value, label)
    }
}

/// The spine (vertebral bodies with discs, the canal, the posterior arch), paraspinal and psoas
/// muscles, and unlabelled bowel loops low in the abdomen, for a patient of `size`, in the
/// layout's frame (+x toward the patient's left, +y anterior, +z superior; the spine's axis at
/// x = 0, y = -70 mm). `flat_discs`: discs 7 mm high; otherwise the drawn phantoms' discs, tube
/// segments whose rounded ends (22 mm) cover most of each vertebral body, kept so that a seed
/// still gives the phantom the demo student was trained and scored on.
fn add_skeleton_and_gut(rng: &mut Rng, size: f64, flat_discs: bool, tissues: &mut Vec<Tissue>) {
    let s = |x: f64, y: f64, z: f64| [x * size, y * size, z];
    let n = |rng: &mut Rng, sd: f64| sd * rng.normal();
    let mut add = |t: Tissue| tissues.push(t);
    // Spine: vertebral bodies with discs every ~30 mm, the canal, the posterior arch.
    let bone = 250.0 + 80.0 * rng.uniform();
    add(Tissue::layered(
        Shape::tube(rng, &[s(0.0, -72.0, 140.0), s(0.0, -70.0, 0.0), s(0.0, -66.0, -140.0)], &[22.0, 23.0, 24.0]),
        0,
        650.0,
        bone,
        0.2,
        rng,
    ));
    let disc_phase = 30.0 * rng.uniform();
    for level in -5..=5 {
        let z = disc_phase + 30.0 * level as f64;
        let disc = if flat_discs {
            Shape::blob(rng, s(0.0, -70.0, z), [23.0, 23.0, 3.5], 4.0, 0.05)
        } else {
            Shape::tube(rng, &[s(0.0, -70.0, z - 3.0), s(0.0, -70.0, z + 3.0)], &[22.0, 22.0])
        };
        add(Tissue::new(disc, 0, 85.0, rng));
    }
    add(Tissue::layered(
        Shape::tube(rng, &[s(0.0, -104.0, 140.0), s(0.0, -102.0, -140.0)], &[17.0, 17.0]),
        0,
        600.0,
        15.0,
        0.4,
        rng,
    ));
    // Paraspinal muscles, psoas growing downwards.
    for x in [-40.0, 40.0] {
        add(Tissue::new(Shape::tube(rng, &[s(x, -100.0, 140.0), s(x, -100.0, -140.0)], &[26.0, 28.0]), 0, 55.0, rng));
        add(Tissue::new(
            Shape::tube(rng, &[s(x * 1.1, -62.0, 10.0), s(x * 1.2, -58.0, -140.0)], &[6.0, 24.0]),
            0,
            55.0,
            rng,
        ));
    }
    // Bowel loops (unlabelled), low in the abdomen, some with gas.
    for _ in 0..4 + rng.below(5) {
        let c = s(n(rng, 60.0), 30.0 + n(rng, 25.0), -60.0 + n(rng, 35.0));
        let mut loop_ = Tissue::layered(
            Shape::blob(rng, c, [25.0, 18.0, 22.0], 40.0, 0.15),
            0,
            45.0,
            15.0 + 15.0 * rng.uniform(),
            0.25,
            rng,
        );
        if rng.chance(0.6) {
            loop_.air_above = Some(c[1] + 5.0 * rng.normal());
        }
        add(loop_);
    }
}

/// Ribs in the upper abdomen, inside a body of semi-axes `body` (mm).
fn add_ribs(rng: &mut Rng, body: [f64; 2], tissues: &mut Vec<Tissue>) {
    let mut add = |t: Tissue| tissues.push(t);
    // Ribs in the upper abdomen: bands of bone just inside the muscle wall, tilted.
    let rib_start = -20.0 + 20.0 * rng.uniform();
    let mut z = rib_start;
    while z < 150.0 {
        for side in [-1.0, 1.0] {
            let points: Vec<[f64; 3]> = (0..=8)
                .map(|i| {
                    let angle = (-95.0 + 140.0 * i as f64 / 8.0f64).to_radians();
                    let rx = body[0] - 32.0;
                    let ry = body[1] - 30.0;
                    [side * rx * angle.cos(), ry * angle.sin(), z + 0.25 * (angle.to_degrees() + 95.0)]
                })
                .collect();
            add(Tissue::layered(Shape::tube(rng, &points, &vec![5.0; points.len()]), 0, 700.0, 300.0, 0.4, rng));
        }
        z += 24.0 + 4.0 * rng.uniform();
    }
}

/// The file stem of the phantom of `seed`.
pub fn case_name(seed: u64) -> String {
    format!("phantom_{seed:05}")
}

/// One case of a written dataset.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenCase {
    pub seed: u64,
    pub image: PathBuf,
    pub label: PathBuf,
    pub phase: &'static str,
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
}

/// Writes the phantoms of `seeds` under `dir` in the Medical Segmentation Decathlon layout
/// (`imagesTr/phantom_SSSSS.nii.gz` as int16 HU, `labelsTr/` the same names as uint8 labels) and a
/// `dataset.json` listing the first `seeds.len() - validation` as `training` and the rest as
/// `validation`, with the BTCV label names. Each file is written to a temporary name and renamed.
/// `progress` is called after each case.
pub fn write_dataset(
    dir: &Path,
    seeds: &[u64],
    validation: usize,
    options: &PhantomOptions,
    progress: &mut dyn FnMut(&WrittenCase),
) -> Result<Vec<WrittenCase>> {
    let make = |seed: u64, _: bool| {
        let p = generate(seed, options);
        let description = format!("prosam synthetic phantom, seed {seed}, {}", p.phase);
        (p, description)
    };
    let about =
        "Synthetic abdominal CT phantoms made by `prosam phantom`: shapes with CT-like intensities, not patient data";
    let licence = "Apache-2.0, like prosam: drawn by prosam, no third-party data";
    write_cases(dir, seeds, validation, ("prosam phantoms", about, licence), options, &make, progress)
}

/// Writes synthetic CTs built around real label maps ([`generate_from`]) in [`write_dataset`]'s
/// layout: the training cases (all but the last `validation`) cycle through `training`, the
/// validation cases through `held_out` (or `training` when it is empty), so that validation can
/// be on anatomy training never saw.
pub fn write_anatomy_dataset(
    dir: &Path,
    seeds: &[u64],
    validation: usize,
    training: &[Arc<LabelAnatomy>],
    held_out: &[Arc<LabelAnatomy>],
    options: &PhantomOptions,
    progress: &mut dyn FnMut(&WrittenCase),
) -> Result<Vec<WrittenCase>> {
    if training.is_empty() {
        return Err(Error::Options("no anatomy to build the training cases around".into()));
    }
    let held_out = if held_out.is_empty() { training } else { held_out };
    let make = |seed: u64, validating: bool| {
        let pool = if validating { held_out } else { training };
        let anatomy = &pool[(seed % pool.len() as u64) as usize];
        let p = generate_from(seed, anatomy, options);
        let description = format!("prosam synthetic CT on {}, seed {seed}, {}", anatomy.name, p.phase);
        (p, description)
    };
    let about = "Synthetic abdominal CTs made by `prosam phantom --anatomy`: real organ label maps (research use) \
                 deformed, with a drawn body and randomised intensities; not patient images";
    let licence = "Research use only: built on the BTCV organ label maps (Multi-Atlas Labeling Beyond the Cranial \
                   Vault, MICCAI 2015, Synapse), whose terms a model trained on these cases inherits";
    let title = ("prosam label-driven synthesis", about, licence);
    write_cases(dir, seeds, validation, title, options, &make, progress)
}

/// Writes the cases `make(seed, is_validation)` gives (the CT and its description) and the
/// dataset.json (see [`write_dataset`]) with the data set's name, description, licence and the
/// options that made it.
fn write_cases(
    dir: &Path,
    seeds: &[u64],
    validation: usize,
    (title, about, licence): (&str, &str, &str),
    options: &PhantomOptions,
    make: &dyn Fn(u64, bool) -> (Phantom, String),
    progress: &mut dyn FnMut(&WrittenCase),
) -> Result<Vec<WrittenCase>> {
    if validation > seeds.len() {
        return Err(Error::Options(format!("{validation} validation cases out of {}", seeds.len())));
    }
    for sub in ["imagesTr", "labelsTr"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|source| Error::Io { path: d.clone(), source })?;
    }
    let mut written = Vec::with_capacity(seeds.len());
    let split = seeds.len() - validation;
    for (n, &seed) in seeds.iter().enumerate() {
        let (p, description) = make(seed, n >= split);
        let name = format!("{}.nii.gz", case_name(seed));
        let (image, label) = (dir.join("imagesTr").join(&name), dir.join("labelsTr").join(&name));
        crate::volume::nifti::write_ct(&image, &p.image, &description)?;
        let header = crate::volume::nifti::header_for(&p.image.affine, p.image.dims);
        crate::volume::nifti::write_labels(&label, &p.labels, p.image.dims, &header, &description)?;
        let case =
            WrittenCase { seed, image, label, phase: p.phase, dims: p.image.dims, spacing: p.image.affine.spacing() };
        progress(&case);
        written.push(case);
    }
    let entry = |c: &WrittenCase| {
        let name = format!("{}.nii.gz", case_name(c.seed));
        serde_json::json!({"image": format!("imagesTr/{name}"), "label": format!("labelsTr/{name}")})
    };
    let labels: serde_json::Map<String, serde_json::Value> = prosam_models::format::BTCV_LABELS
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), serde_json::Value::from(*n)))
        .collect();
    let json = serde_json::json!({
        "name": title,
        "description": about,
        "licence": licence,
        "reference": "prosam",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "seeds": seeds,
        "options": options,
        "numTraining": split,
        "training": written[..split].iter().map(entry).collect::<Vec<_>>(),
        "validation": written[split..].iter().map(entry).collect::<Vec<_>>(),
    });
    let path = dir.join("dataset.json");
    let text = serde_json::to_string_pretty(&json).expect("JSON");
    prosam_models::temp_file::write_via_temp(&path, |tmp| std::fs::write(tmp, text.as_bytes()))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label values present and their volumes in mL.
    fn label_volumes_ml(labels: &[u8], affine: &Affine) -> std::collections::BTreeMap<u8, f64> {
        let voxel_ml = affine.det3().abs() / 1000.0;
        let mut counts = std::collections::BTreeMap::new();
        for &l in labels {
            *counts.entry(l).or_insert(0u64) += 1;
        }
        counts.into_iter().map(|(l, c)| (l, c as f64 * voxel_ml)).collect()
    }

    /// Label -> (mean HU, volume in mL).
    fn organs(p: &Phantom) -> std::collections::BTreeMap<u8, (f64, f64)> {
        let volumes = label_volumes_ml(&p.labels, &p.image.affine);
        let mut sums = std::collections::BTreeMap::new();
        for (&l, &v) in p.labels.iter().zip(&p.image.data) {
            let e = sums.entry(l).or_insert((0.0, 0u64));
            e.0 += v as f64;
            e.1 += 1;
        }
        sums.into_iter().map(|(l, (s, n))| (l, (s / n as f64, volumes[&l]))).collect()
    }

    #[test]
    fn organs_have_realistic_sizes_and_overlapping_intensities() {
        for seed in 0..4 {
            let p = generate(seed, &PhantomOptions::default());
            let o = organs(&p);
            eprintln!(
                "seed {seed} ({}, {:?} voxels, spacing {:?}): {o:.1?}",
                p.phase,
                p.image.dims,
                p.image.affine.spacing()
            );
            assert_eq!(o.len(), 14, "every BTCV organ and background present");
            let ml = |l: u8| o[&l].1;
            assert!((1100.0..2000.0).contains(&ml(label::LIVER)), "liver {} mL", ml(label::LIVER));
            assert!((80.0..350.0).contains(&ml(label::SPLEEN)), "spleen {} mL", ml(label::SPLEEN));
            for l in [label::RIGHT_KIDNEY, label::LEFT_KIDNEY] {
                assert!((90.0..220.0).contains(&ml(l)), "kidney {} mL", ml(l));
            }
            for l in [label::RIGHT_ADRENAL, label::LEFT_ADRENAL] {
                assert!((1.5..10.0).contains(&ml(l)), "adrenal {} mL", ml(l));
            }
            let hu = |l: u8| o[&l].0;
            let soft = [label::LIVER, label::SPLEEN, label::PANCREAS];
            let (lo, hi) =
                soft.iter().map(|&l| hu(l)).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
            assert!(hi - lo < 45.0, "liver, spleen and pancreas within a few tens of HU: {lo:.0}..{hi:.0}");
        }
    }

    /// World (RAS mm) centroid of each label.
    fn centroids(p: &Phantom) -> std::collections::BTreeMap<u8, [f64; 3]> {
        let [nx, ny, _] = p.image.dims;
        let mut sums = std::collections::BTreeMap::new();
        for (i, &l) in p.labels.iter().enumerate() {
            let w = p.image.affine.apply([(i % nx) as f64, ((i / nx) % ny) as f64, (i / (nx * ny)) as f64]);
            let e = sums.entry(l).or_insert(([0.0; 3], 0u64));
            (0..3).for_each(|a| e.0[a] += w[a]);
            e.1 += 1;
        }
        sums.into_iter().map(|(l, (s, n))| (l, s.map(|v| v / n as f64))).collect()
    }

    #[test]
    fn organs_lie_on_their_side_in_ras_whatever_the_storage_order() {
        // RAS: +x toward the patient's right, +y anterior, +z superior; the flips of storage vary.
        for seed in 0..4 {
            let p = generate(seed, &PhantomOptions { in_plane_mm: (3.0, 4.0), ..PhantomOptions::default() });
            let c = centroids(&p);
            let x = |l: u8| c[&l][0];
            assert!(x(label::LIVER) > 30.0 && x(label::GALLBLADDER) > 0.0, "seed {seed}: liver on the right: {c:.0?}");
            assert!(x(label::SPLEEN) < -30.0 && x(label::STOMACH) < 0.0, "seed {seed}: spleen on the left: {c:.0?}");
            assert!(x(label::RIGHT_KIDNEY) > 30.0 && x(label::LEFT_KIDNEY) < -30.0, "seed {seed}: kidneys: {c:.0?}");
            assert!(x(label::RIGHT_ADRENAL) > x(label::LEFT_ADRENAL) && x(label::IVC) > x(label::AORTA));
            assert!(c[&label::LIVER][2] > c[&label::RIGHT_KIDNEY][2], "seed {seed}: the liver above the kidney");
            // The oesophagus runs in front of the aorta, not inside it: most of its tube is visible.
            let ml = label_volumes_ml(&p.labels, &p.image.affine);
            assert!(ml[&label::ESOPHAGUS] > 8.0, "seed {seed}: oesophagus {} mL", ml[&label::ESOPHAGUS]);
            assert!(c[&label::ESOPHAGUS][1] > c[&label::AORTA][1], "seed {seed}: oesophagus anterior to the aorta");
        }
    }

    #[test]
    fn a_seed_gives_one_phantom() {
        let small = PhantomOptions { in_plane_mm: (3.0, 4.0), slice_mm: (4.0, 5.0), ..PhantomOptions::default() };
        let a = generate(7, &small);
        let b = generate(7, &small);
        let c = generate(8, &small);
        assert_eq!(a.image.data, b.image.data);
        assert_eq!(a.labels, b.labels);
        assert_ne!(a.labels, c.labels);
    }
}
