//! Label-driven synthesis: synthetic CTs built around real organ label maps (the BTCV anatomies),
//! SynthSeg's way: the organs are real, everything that cannot be modelled is randomised.
//!
//! A label map is deformed (per-axis scaling of a few percent, a smooth elastic field, the
//! pose's small rotation; never mirrored) and placed so that its aorta sits where the drawn
//! phantoms keep theirs, in front of the spine. Around it the drawn anatomy is built as for a
//! phantom (skin, subcutaneous and visceral fat, the abdominal wall, spine, paraspinal and psoas
//! muscles, ribs; bowel packed into the free peritoneal space, `bowel.rs`, or a few loops), the
//! body widened to hold the organs, with the lung bases above the real diaphragm (the top of
//! liver, spleen and stomach in each column) and the iliac wings below the kidneys. Organ
//! intensities follow a contrast phase with wide per-case spread; noise (5-30 HU), blur and the
//! field of view (anywhere from above the lung bases to the pelvis, or a thin slab) are drawn per
//! case.

use std::path::Path;
use std::sync::Arc;

use super::bowel::PackedBowel;
use super::{Anatomy, Bowel, Contrast, Phantom, PhantomOptions, Scan, Shape, Tissue, Waves, label, render};
use crate::rng::Rng;
use crate::volume::Affine;
use crate::{Error, Result};

/// Where the drawn layout keeps the aorta (x toward the patient's left, y anterior), in mm: the
/// real aorta is placed here, in front of the drawn spine (whose axis is at 0, -70).
const AORTA_AT: [f64; 2] = [8.0, -40.0];

/// A real anatomy: an organ label map on an isotropic grid, read and checked once, with what the
/// synthesis needs of it precomputed.
#[derive(Debug)]
pub struct LabelAnatomy {
    pub name: String,
    labels: Vec<u8>,
    dims: [usize; 3],
    /// RAS world (mm) to voxel.
    to_voxel: Affine,
    /// The aorta's mean x and y, and the organs' middle height (RAS mm): the anatomy's origin.
    anchor: [f64; 3],
    /// Lowest and highest organ voxel, and the kidneys' lowest point (RAS z, mm).
    organ_z: (f64, f64),
    kidney_bottom: f64,
    /// Per (i, j) column of the grid: the highest RAS z of liver, spleen or stomach (the
    /// diaphragm), or NaN.
    dome: Vec<f32>,
    dome_fallback: f64,
    /// The stomach's mean RAS y.
    stomach_y: f64,
    /// Organ voxels (every other one along each axis) as RAS x, y relative to the anchor.
    outline: Vec<[f32; 2]>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Nifti { path: path.to_path_buf(), reason: reason.into() }
}

/// The affine of an axis-aligned grid of `spacing` whose stored axes point along `codes`
/// (`LAS`: axis 0 toward the patient's left, 1 anterior, 2 superior).
fn affine_of_codes(codes: &str, spacing: f64) -> Option<Affine> {
    let mut rows = [[0.0; 4]; 3];
    for (axis, (world, negative)) in prosam_models::format::metadata::parse_axis_codes(codes)?.into_iter().enumerate() {
        rows[world][axis] = if negative { -spacing } else { spacing };
    }
    Some(Affine::from_rows(rows))
}

impl LabelAnatomy {
    /// Reads a BTCV label map (labels 0-13, isotropic voxels). `axes`: the stored axes' directions
    /// (`LAS` for the BTCV release, whose affine claims RAS); `None` trusts the file's affine. A
    /// map whose liver lies left of its spleen in world coordinates is refused: its affine and
    /// storage disagree, and synthesis would learn a mirrored body.
    pub fn read(path: &Path, axes: Option<&str>) -> Result<LabelAnatomy> {
        let input = crate::volume::nifti::read(path)?;
        let volume = input.volume;
        let dims = volume.dims;
        if dims.iter().any(|&d| d < 8) {
            return Err(bad(path, format!("is {dims:?} voxels: a 3D label map is needed, not a slice")));
        }
        let spacing = volume.affine.spacing();
        let (lo, hi) = spacing.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &s| (a.min(s), b.max(s)));
        if hi > lo * 1.01 {
            return Err(bad(
                path,
                format!("has anisotropic voxels {spacing:.3?} mm; resample it to isotropic voxels first"),
            ));
        }
        let affine = match axes {
            Some(codes) => affine_of_codes(codes, lo).ok_or_else(|| {
                Error::Options(format!("anatomy axes `{codes}` are not three of L/R, P/A, I/S on distinct axes"))
            })?,
            None => volume.affine,
        };
        let mut labels = Vec::with_capacity(volume.data.len());
        for (i, &v) in volume.data.iter().enumerate() {
            if v != v.round() || !(0.0..=13.0).contains(&v) {
                let at = [i % dims[0], i / dims[0] % dims[1], i / (dims[0] * dims[1])];
                return Err(bad(path, format!("holds the value {v} at voxel {at:?}, not one of the BTCV labels 0-13")));
            }
            labels.push(v as u8);
        }
        let world = |i: usize| {
            affine.apply([(i % dims[0]) as f64, (i / dims[0] % dims[1]) as f64, (i / (dims[0] * dims[1])) as f64])
        };
        let mut sums = [[0.0f64; 4]; 14];
        let mut organ_z = (f64::INFINITY, f64::NEG_INFINITY);
        let mut kidney_bottom = f64::INFINITY;
        for (i, &l) in labels.iter().enumerate().filter(|(_, l)| **l > 0) {
            let w = world(i);
            let s = &mut sums[l as usize];
            (0..3).for_each(|a| s[a] += w[a]);
            s[3] += 1.0;
            organ_z = (organ_z.0.min(w[2]), organ_z.1.max(w[2]));
            if l == label::RIGHT_KIDNEY || l == label::LEFT_KIDNEY {
                kidney_bottom = kidney_bottom.min(w[2]);
            }
        }
        if sums.iter().all(|s| s[3] == 0.0) {
            return Err(bad(path, "holds no organ (every voxel is 0)"));
        }
        let centroid = |l: u8| {
            let s = sums[l as usize];
            (s[3] > 0.0).then(|| [s[0] / s[3], s[1] / s[3], s[2] / s[3]])
        };
        let need = |l: u8, name: &str| {
            centroid(l)
                .ok_or_else(|| bad(path, format!("lacks the {name} (label {l}), which synthesis places the body by")))
        };
        let (liver, spleen, aorta) =
            (need(label::LIVER, "liver")?, need(label::SPLEEN, "spleen")?, need(label::AORTA, "aorta")?);
        if liver[0] <= spleen[0] {
            return Err(bad(
                path,
                format!(
                    "the liver (x = {:.0} mm) lies on the patient's left of the spleen (x = {:.0} mm) in world \
                     coordinates: the file's affine does not match how its voxels are stored (the BTCV release \
                     stores LAS under an affine that claims RAS: give the axes, e.g. --anatomy-axes LAS)",
                    liver[0], spleen[0]
                ),
            ));
        }
        let kidney_bottom = if kidney_bottom.is_finite() { kidney_bottom } else { organ_z.0 };
        let anchor = [aorta[0], aorta[1], (organ_z.0 + organ_z.1) / 2.0];
        let mut dome = vec![f32::NAN; dims[0] * dims[1]];
        let mut outline = Vec::new();
        for (i, &l) in labels.iter().enumerate().filter(|(_, l)| **l > 0) {
            let (x, y, z) = (i % dims[0], i / dims[0] % dims[1], i / (dims[0] * dims[1]));
            let w = world(i);
            if matches!(l, label::LIVER | label::SPLEEN | label::STOMACH) {
                let top = &mut dome[x + dims[0] * y];
                if top.is_nan() || w[2] as f32 > *top {
                    *top = w[2] as f32;
                }
            }
            if x % 2 == 0 && y % 2 == 0 && z % 2 == 0 {
                outline.push([(w[0] - anchor[0]) as f32, (w[1] - anchor[1]) as f32]);
            }
        }
        let mut tops: Vec<f32> = dome.iter().copied().filter(|v| !v.is_nan()).collect();
        tops.sort_by(f32::total_cmp);
        let dome_fallback = tops.get(tops.len() / 2).map_or(anchor[2] + 60.0, |&v| v as f64);
        let stomach_y = centroid(label::STOMACH).map_or(anchor[1] + 60.0, |c| c[1]);
        let to_voxel = affine.inverse().expect("an axis-aligned affine of a positive spacing");
        let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(LabelAnatomy {
            name,
            labels,
            dims,
            to_voxel,
            anchor,
            organ_z,
            kidney_bottom,
            dome,
            dome_fallback,
            stomach_y,
            outline,
        })
    }

    /// The stored voxel nearest to RAS `w`, if inside the grid.
    fn voxel(&self, w: [f64; 3]) -> Option<[usize; 3]> {
        let v = self.to_voxel.apply(w);
        let mut at = [0usize; 3];
        for a in 0..3 {
            let r = v[a].round();
            if !(0.0..self.dims[a] as f64).contains(&r) {
                return None;
            }
            at[a] = r as usize;
        }
        Some(at)
    }

    fn label_at(&self, w: [f64; 3]) -> u8 {
        self.voxel(w).map_or(0, |[i, j, k]| self.labels[i + self.dims[0] * (j + self.dims[1] * k)])
    }

    /// The diaphragm's height above RAS (x, y) of `w`.
    fn dome_at(&self, w: [f64; 3]) -> f64 {
        let clamped = [w[0], w[1], self.anchor[2]];
        match self.voxel(clamped) {
            Some([i, j, _]) if !self.dome[i + self.dims[0] * j].is_nan() => self.dome[i + self.dims[0] * j] as f64,
            _ => self.dome_fallback,
        }
    }
}

/// One case's real organs: the anatomy, its deformation and the organs' intensities.
#[derive(Debug)]
pub(super) struct RealOrgans {
    anatomy: Arc<LabelAnatomy>,
    /// Layout mm per anatomy mm, per axis.
    scale: [f64; 3],
    /// The elastic displacement (mm) along each axis.
    elastic: [Waves; 3],
    /// HU by label, and each organ's texture.
    hu: [f64; 14],
    texture: Vec<Waves>,
    /// Gas above this RAS y in the stomach.
    stomach_air: Option<f64>,
    lung_hu: f64,
    heart_hu: f64,
    lung_texture: Waves,
    /// The heart's centre (layout x, y) and semi-axes (mm): an elliptic column in front of the
    /// spine, left of the midline, above the diaphragm.
    heart: ([f64; 2], [f64; 2]),
}

impl RealOrgans {
    /// The anatomy's RAS point at layout point `q`.
    fn world(&self, q: [f64; 3]) -> [f64; 3] {
        let d: [f64; 3] = std::array::from_fn(|a| q[a] / self.scale[a] + self.elastic[a].at(q));
        let o = self.anatomy.anchor;
        [o[0] - (d[0] - AORTA_AT[0]), o[1] + (d[1] - AORTA_AT[1]), o[2] + d[2]]
    }

    /// The organ at layout point `q`: its HU and label.
    pub(super) fn organ(&self, q: [f64; 3]) -> Option<(f64, u8)> {
        let w = self.world(q);
        let l = self.anatomy.label_at(w);
        if l == 0 {
            return None;
        }
        if l == label::STOMACH && self.stomach_air.is_some_and(|y| w[1] > y) {
            return Some((-990.0, l));
        }
        Some((self.hu[l as usize] + self.texture[l as usize].at(q), l))
    }

    /// Inside the body's cavity above the diaphragm: lung, or the heart.
    pub(super) fn above_diaphragm(&self, q: [f64; 3]) -> Option<f64> {
        let w = self.world(q);
        if w[2] < self.anatomy.dome_at(w) + 4.0 {
            return None;
        }
        let ([cx, cy], [ax, ay]) = self.heart;
        if ((q[0] - cx) / ax).powi(2) + ((q[1] - cy) / ay).powi(2) < 1.0 {
            return Some(self.heart_hu + self.lung_texture.at(q) * 0.2);
        }
        Some(self.lung_hu + self.lung_texture.at(q))
    }
}

impl Anatomy {
    /// A patient around the real organs of `anatomy`.
    fn from_labels(rng: &mut Rng, anatomy: Arc<LabelAnatomy>, bowel: Bowel) -> Anatomy {
        let n = |rng: &mut Rng, sd: f64| sd * rng.normal();
        let size = 0.9 + 0.2 * rng.uniform();
        let mut body = [160.0 * size * (0.95 + 0.1 * rng.uniform()), 115.0 * size * (0.92 + 0.16 * rng.uniform())];
        let c = Contrast::random(rng);
        // The packed bowel draws from its own stream, so that the rest of a case is the same
        // with either kind of bowel.
        let bowel = (bowel == Bowel::Packed).then(|| {
            let mut peek = *rng;
            let mut own = Rng::new(peek.next_u64() ^ 0x424F_5745_4C5F_5041);
            PackedBowel::random(&mut own, c.wall)
        });
        let mut tissues = Vec::new();
        super::add_skeleton_and_gut(rng, size, true, &mut tissues);
        let mut fat = 8.0 + 30.0 * rng.uniform();
        let muscle = 7.0 + 8.0 * rng.uniform();
        let scale: [f64; 3] = std::array::from_fn(|_| 0.94 + 0.12 * rng.uniform());
        // Every organ inside the abdominal wall: the body grows by up to a third, then the
        // subcutaneous fat thins (to 4 mm at least) until the organs fit.
        let reach = |body: [f64; 2]| {
            anatomy
                .outline
                .iter()
                .map(|&[dx, dy]| {
                    let q0 = AORTA_AT[0] - dx as f64 * scale[0];
                    let q1 = AORTA_AT[1] + dy as f64 * scale[1];
                    ((q0 / body[0]).powi(2) + (q1 / body[1]).powi(2)).sqrt()
                })
                .fold(0.0f64, f64::max)
        };
        let room = |body: [f64; 2], fat: f64| 1.0 - (fat + muscle + 3.0) / body[1];
        let thinnest = 4.0;
        let grow = (reach(body) / room(body, thinnest)).clamp(1.0, 1.33);
        body = body.map(|b| b * grow);
        let r = reach(body);
        if r > room(body, fat) {
            fat = ((1.0 - r) * body[1] - muscle - 3.0).max(thinnest);
        }
        super::add_ribs(rng, body, &mut tissues);
        // The iliac wings: posterolateral bands of bone from below the kidneys down.
        let pelvis_top = (anatomy.kidney_bottom - anatomy.anchor[2]) * scale[2] - 25.0 - 20.0 * rng.uniform();
        let mut z = pelvis_top;
        while z > -220.0 {
            let flare = ((pelvis_top - z) / 60.0).min(1.0);
            for side in [-1.0, 1.0] {
                let points: Vec<[f64; 3]> = (0..=6)
                    .map(|i| {
                        let angle = (-75.0 + 65.0 * i as f64 / 6.0f64).to_radians();
                        let (rx, ry) = (body[0] * (0.45 + 0.25 * flare), body[1] * 0.62);
                        [side * rx * angle.cos(), ry * angle.sin(), z]
                    })
                    .collect();
                tissues.push(Tissue::layered(
                    Shape::tube(rng, &points, &vec![6.0; points.len()]),
                    0,
                    650.0,
                    260.0,
                    0.4,
                    rng,
                ));
            }
            z -= 9.0;
        }
        let jitter = |rng: &mut Rng, v: f64| v + n(rng, 12.0);
        let mut hu = [0.0; 14];
        hu[label::SPLEEN as usize] = jitter(rng, c.spleen);
        let kidney = jitter(rng, c.kidney);
        hu[label::RIGHT_KIDNEY as usize] = kidney;
        hu[label::LEFT_KIDNEY as usize] = kidney + n(rng, 5.0);
        hu[label::GALLBLADDER as usize] = 8.0 + n(rng, 10.0);
        hu[label::ESOPHAGUS as usize] = jitter(rng, 40.0);
        hu[label::LIVER as usize] = jitter(rng, c.liver);
        hu[label::STOMACH as usize] = c.wall * 0.5 + 10.0 + n(rng, 15.0);
        hu[label::AORTA as usize] = jitter(rng, c.aorta);
        // Below the renal veins the IVC fills later than the portal system.
        hu[label::IVC as usize] = jitter(rng, c.veins - 15.0);
        hu[label::PORTAL_SPLENIC_VEIN as usize] = jitter(rng, c.veins);
        hu[label::PANCREAS as usize] = jitter(rng, c.pancreas);
        let adrenal = 35.0 + 0.2 * (c.liver - 60.0);
        hu[label::RIGHT_ADRENAL as usize] = jitter(rng, adrenal);
        hu[label::LEFT_ADRENAL as usize] = jitter(rng, adrenal);
        let texture = (0..14)
            .map(|_| {
                let amplitude = 4.0 + 6.0 * rng.uniform();
                Waves::random(rng, 3, 25.0, amplitude)
            })
            .collect();
        let stomach_air = rng.chance(0.6).then(|| anatomy.stomach_y + 8.0 + n(rng, 8.0));
        let elastic = std::array::from_fn(|_| {
            let amplitude = 3.0 + 4.0 * rng.uniform();
            Waves::random(rng, 4, 90.0, amplitude)
        });
        let real = RealOrgans {
            anatomy,
            scale,
            elastic,
            hu,
            texture,
            stomach_air,
            lung_hu: -860.0 + n(rng, 25.0),
            heart_hu: 40.0 + 0.3 * (c.aorta - 40.0) + n(rng, 10.0),
            lung_texture: Waves::random(rng, 3, 20.0, 25.0),
            heart: ([12.0 * size, 20.0 * size], [55.0 * size, 45.0 * size]),
        };
        let pose = super::random_rotation(rng, 5.0);
        let shift = [n(rng, 6.0), n(rng, 6.0), n(rng, 6.0)];
        Anatomy {
            body,
            fat,
            muscle,
            outline: Waves::random(rng, 3, 120.0, 0.04),
            pose,
            shift,
            fat_hu: -100.0 + n(rng, 12.0),
            muscle_hu: 50.0 + n(rng, 8.0),
            tissues,
            phase: c.phase,
            real: Some(real),
            bowel,
        }
    }
}

/// The synthetic CT of `seed` around `anatomy`: deterministic for a seed, an anatomy and options.
/// The field of view reaches from somewhere between 50 mm below and 40 mm above the organs' top
/// down to somewhere between 20 mm above the organs' lowest point and 110 mm below it (the
/// pelvis), so organs are cut by the scan's edge in some cases; in-plane it holds the body. A
/// share of the cases ([`PhantomOptions::thin_fov`]) is a slab of 40-100 mm through the organs.
pub fn generate_from(seed: u64, anatomy: &Arc<LabelAnatomy>, options: &PhantomOptions) -> Phantom {
    let mut rng = Rng::new(seed ^ 0x4C41_4245_4C53_0000);
    let body = Anatomy::from_labels(&mut rng, anatomy.clone(), options.bowel);
    let (bottom, top) = anatomy.organ_z;
    let scale_z = body.real.as_ref().map_or(1.0, |r| r.scale[2]);
    let (organ_bottom, organ_top) = ((bottom - anatomy.anchor[2]) * scale_z, (top - anatomy.anchor[2]) * scale_z);
    let mut top = (organ_top - 50.0 + 90.0 * rng.uniform()).min(150.0);
    let mut bottom = (organ_bottom + 20.0 - 130.0 * rng.uniform()).max(-150.0);
    // A thin slab through the organs, drawn from its own stream so that the rest of the case is
    // the same either way.
    let mut slab = Rng::new(seed ^ 0x534C_4142_0000_0000);
    if slab.chance(options.thin_fov) {
        let thickness = 40.0 + 60.0 * slab.uniform();
        let centre = organ_bottom + (organ_top - organ_bottom) * slab.uniform();
        (bottom, top) = ((centre - thickness / 2.0).max(-150.0), (centre + thickness / 2.0).min(150.0));
    }
    let scan = Scan {
        field_of_view_mm: [2.0 * body.body[0] + 30.0, 2.0 * body.body[1] + 30.0, (top - bottom).max(40.0)],
        center_mm: [0.0, 0.0, (top + bottom) / 2.0],
        blur: 0.3 + 0.7 * rng.uniform(),
        noise_hu: (5.0, 30.0),
    };
    render(&body, &mut rng, options, &scan)
}
