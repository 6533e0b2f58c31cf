//! Training crops as the reference recipe draws them: MONAI's `RandCropByPosNegLabeld(pos=2,
//! neg=1, num_samples=1)` (or, as an option, `RandCropByLabelClassesd`), then `RandFlipd` on each
//! axis and `RandRotate90d` in the plane of axes 0 and 1, each with probability 0.1.

use prosam_models::format::Intensity;
use prosam_runtime::pipeline::intensity;
use serde::{Deserialize, Serialize};

use crate::data::Case;
use crate::rng::Rng;

/// How a crop's centre voxel is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropSampling {
    /// MONAI's `RandCropByPosNegLabeld`: a foreground voxel with weight `pos`, a background one
    /// with weight `neg` (the reference recipe). Big organs own most foreground voxels, so most
    /// crops centre on them.
    #[default]
    PosNeg,
    /// MONAI's `RandCropByLabelClassesd` with equal ratios: one of the classes present in the case
    /// (background included) uniformly, then one of its voxels. A vessel or an adrenal gland is a
    /// crop's centre as often as the liver, as nnU-Net's foreground oversampling does it.
    Classes,
}

impl std::str::FromStr for CropSampling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pos_neg" | "posneg" => Ok(CropSampling::PosNeg),
            "classes" => Ok(CropSampling::Classes),
            _ => Err(format!("crop sampling must be pos_neg or classes, got `{s}`")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropOptions {
    pub size: [usize; 3],
    pub sampling: CropSampling,
    /// Relative weights of crops centred on foreground and on background voxels (`PosNeg`).
    pub pos: f64,
    pub neg: f64,
    /// Probability of a flip, per axis.
    pub flip_p: f64,
    /// Probability of a rotation by 90, 180 or 270 degrees in the (0, 1) plane.
    pub rot90_p: f64,
}

impl CropOptions {
    pub fn reference(size: [usize; 3]) -> Self {
        Self { size, sampling: CropSampling::PosNeg, pos: 2.0, neg: 1.0, flip_p: 0.1, rot90_p: 0.1 }
    }

    pub fn with_sampling(self, sampling: CropSampling) -> Self {
        Self { sampling, ..self }
    }
}

/// A case's candidate crop centres, grouped as `sampling` draws them: `[foreground, background]`
/// for `PosNeg`, one group per class present for `Classes`. Built once per case and epoch.
#[derive(Debug, Clone)]
pub struct Centres {
    sampling: CropSampling,
    groups: Vec<Vec<u32>>,
}

impl Centres {
    pub fn new(case: &Case, sampling: CropSampling) -> Self {
        let groups = match sampling {
            CropSampling::PosNeg => {
                let (mut fg, mut bg) = (Vec::new(), Vec::new());
                for (i, &l) in case.labels.iter().enumerate() {
                    if l > 0 { fg.push(i as u32) } else { bg.push(i as u32) }
                }
                vec![fg, bg]
            }
            CropSampling::Classes => {
                let mut by_class = vec![Vec::new(); 256];
                for (i, &l) in case.labels.iter().enumerate() {
                    by_class[l as usize].push(i as u32);
                }
                by_class.retain(|g| !g.is_empty());
                by_class
            }
        };
        Self { sampling, groups }
    }

    /// The flat index of the next crop's centre.
    fn draw(&self, o: &CropOptions, rng: &mut Rng) -> usize {
        let group = match self.sampling {
            CropSampling::PosNeg => {
                let (fg, bg) = (&self.groups[0], &self.groups[1]);
                let positive = !fg.is_empty() && (bg.is_empty() || rng.chance(o.pos / (o.pos + o.neg)));
                if positive { fg } else { bg }
            }
            CropSampling::Classes => &self.groups[rng.below(self.groups.len())],
        };
        group[rng.below(group.len())] as usize
    }
}

/// A crop: the input of each network it is drawn for (one image per intensity transform,
/// normalised, zero beyond the volume) and its labels, C order. Distillation draws one crop for
/// two networks: the same voxels, each normalised its own way.
#[derive(Debug, Clone, PartialEq)]
pub struct Crop {
    pub images: Vec<Vec<f32>>,
    pub labels: Vec<u8>,
    pub size: [usize; 3],
}

/// Draws one crop of `case` centred on one of `centres` (built for `case` with `o.sampling`);
/// the crop's HU are normalised with each of `intensities` after cropping, one image each.
pub fn random_crop(case: &Case, centres: &Centres, intensities: &[&Intensity], o: &CropOptions, rng: &mut Rng) -> Crop {
    debug_assert_eq!(centres.sampling, o.sampling);
    let dims = case.dims;
    let centre = centres.draw(o, rng);
    let centre = [centre / (dims[1] * dims[2]), (centre / dims[2]) % dims[1], centre % dims[2]];
    // MONAI's `correct_crop_centers`: the crop stays inside the volume where it fits.
    let start = [0, 1, 2].map(|a| centre[a].saturating_sub(o.size[a] / 2).min(dims[a].saturating_sub(o.size[a])));
    let mut crop = extract(case, start, o.size, intensities);
    for axis in 0..3 {
        if rng.chance(o.flip_p) {
            flip(&mut crop, axis);
        }
    }
    if o.size[0] == o.size[1] && rng.chance(o.rot90_p) {
        let k = 1 + rng.below(3);
        for _ in 0..k {
            rot90(&mut crop);
        }
    }
    crop
}

/// The crop at `start` (beyond the volume: background, and 0 in the network's input space).
pub fn extract(case: &Case, start: [usize; 3], size: [usize; 3], intensities: &[&Intensity]) -> Crop {
    let dims = case.dims;
    let n: usize = size.iter().product();
    let (mut image, mut labels, mut inside) = (vec![0f32; n], vec![0u8; n], vec![false; n]);
    for a in 0..size[0].min(dims[0].saturating_sub(start[0])) {
        for b in 0..size[1].min(dims[1].saturating_sub(start[1])) {
            let len = size[2].min(dims[2].saturating_sub(start[2]));
            let src = ((start[0] + a) * dims[1] + start[1] + b) * dims[2] + start[2];
            let dst = (a * size[1] + b) * size[2];
            image[dst..dst + len].copy_from_slice(&case.image[src..src + len]);
            labels[dst..dst + len].copy_from_slice(&case.labels[src..src + len]);
            inside[dst..dst + len].iter_mut().for_each(|v| *v = true);
        }
    }
    let images = intensities
        .iter()
        .map(|tf| {
            let mut normalised = image.clone();
            intensity::apply(tf, &mut normalised);
            normalised.iter_mut().zip(&inside).filter(|(_, inside)| !**inside).for_each(|(v, _)| *v = 0.0);
            normalised
        })
        .collect();
    Crop { images, labels, size }
}

/// Reverses `axis` (`np.flip`).
pub fn flip(crop: &mut Crop, axis: usize) {
    let s = crop.size;
    let index = |i: [usize; 3]| (i[0] * s[1] + i[1]) * s[2] + i[2];
    let (images, labels) = (crop.images.clone(), crop.labels.clone());
    for a in 0..s[0] {
        for b in 0..s[1] {
            for c in 0..s[2] {
                let mut from = [a, b, c];
                from[axis] = s[axis] - 1 - from[axis];
                for (out, image) in crop.images.iter_mut().zip(&images) {
                    out[index([a, b, c])] = image[index(from)];
                }
                crop.labels[index([a, b, c])] = labels[index(from)];
            }
        }
    }
}

/// `np.rot90(x, 1, axes=(0, 1))`: `out[i, j] = in[j, n1 - 1 - i]`; axes 0 and 1 swap sizes.
pub fn rot90(crop: &mut Crop) {
    let s = crop.size;
    let out_size = [s[1], s[0], s[2]];
    let (images, labels) = (crop.images.clone(), crop.labels.clone());
    for i in 0..out_size[0] {
        for j in 0..out_size[1] {
            for k in 0..s[2] {
                let src = (j * s[1] + (s[1] - 1 - i)) * s[2] + k;
                let dst = (i * out_size[1] + j) * s[2] + k;
                for (out, image) in crop.images.iter_mut().zip(&images) {
                    out[dst] = image[src];
                }
                crop.labels[dst] = labels[src];
            }
        }
    }
    crop.size = out_size;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> Case {
        let dims = [4, 3, 2];
        let n = 24;
        Case {
            name: "t".into(),
            image: (0..n).map(|v| v as f32).collect(),
            labels: (0..n).map(|v| (v == 17) as u8).collect(),
            dims,
        }
    }

    const IDENTITY: Intensity = Intensity::ScaleWindow { a_min: 0.0, a_max: 1.0, b_min: 0.0, b_max: 1.0, clip: false };

    #[test]
    fn rot90_matches_numpy_and_four_make_the_identity() {
        // np.rot90(np.arange(6).reshape(2, 3, 1), 1, axes=(0, 1)).ravel() == [2, 5, 1, 4, 0, 3]
        let mut c = Crop { images: vec![(0..6).map(|v| v as f32).collect()], labels: vec![0; 6], size: [2, 3, 1] };
        rot90(&mut c);
        assert_eq!(c.size, [3, 2, 1]);
        assert_eq!(c.images[0], vec![2., 5., 1., 4., 0., 3.]);
        let mut d = Crop {
            images: vec![(0..18).map(|v| v as f32).collect()],
            labels: (0..18).map(|v| v as u8).collect(),
            size: [3, 3, 2],
        };
        let original = d.clone();
        (0..4).for_each(|_| rot90(&mut d));
        assert_eq!(d, original);
        flip(&mut d, 2);
        assert_eq!(d.images[0][0], 1.0);
        flip(&mut d, 2);
        assert_eq!(d, original);
    }

    #[test]
    fn positive_crops_contain_the_foreground_and_pad_with_zero() {
        let case = case();
        let o = CropOptions {
            size: [2, 2, 4],
            sampling: CropSampling::PosNeg,
            pos: 1.0,
            neg: 0.0,
            flip_p: 0.0,
            rot90_p: 0.0,
        };
        let centres = Centres::new(&case, o.sampling);
        let mut rng = Rng::new(1);
        for _ in 0..10 {
            let crop = random_crop(&case, &centres, &[&IDENTITY], &o, &mut rng);
            assert_eq!(crop.labels.iter().filter(|&&l| l == 1).count(), 1, "{crop:?}");
            // Axis 2 has 2 voxels, the crop 4: the last two are padding.
            assert!(crop.images[0].chunks(4).all(|row| row[2] == 0.0 && row[3] == 0.0));
        }
    }

    #[test]
    fn class_sampling_centres_each_present_class_equally_often() {
        // 24 voxels: one of class 2, five of class 1, the rest background; class 3 is absent.
        let mut case = case();
        case.labels = (0..24)
            .map(|v| {
                if v == 17 {
                    2
                } else if v < 5 {
                    1
                } else {
                    0
                }
            })
            .collect();
        let o = CropOptions::reference([2, 2, 2]).with_sampling(CropSampling::Classes);
        let centres = Centres::new(&case, o.sampling);
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 4];
        let draws = 3000;
        for _ in 0..draws {
            counts[case.labels[centres.draw(&o, &mut rng)] as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        for (class, &n) in counts[..3].iter().enumerate() {
            let share = n as f64 / draws as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.04, "class {class}: {share}");
        }
        // Positive/negative sampling centres the single class-2 voxel about 2/3 x 1/6 of the time.
        let o = CropOptions::reference([2, 2, 2]);
        let centres = Centres::new(&case, o.sampling);
        let rare = (0..draws).filter(|_| case.labels[centres.draw(&o, &mut rng)] == 2).count();
        assert!((rare as f64 / draws as f64 - 1.0 / 9.0).abs() < 0.03, "{rare}");
    }
}
