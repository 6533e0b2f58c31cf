//! Training crops as the reference recipe draws them: MONAI's `RandCropByPosNegLabeld(pos=2,
//! neg=1, num_samples=1)`, then `RandFlipd` on each axis and `RandRotate90d` in the plane of
//! axes 0 and 1, each with probability 0.1.

use prosam_models::format::Intensity;
use prosam_runtime::pipeline::intensity;
use serde::{Deserialize, Serialize};

use crate::data::Case;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropOptions {
    pub size: [usize; 3],
    /// Relative weights of crops centred on foreground and on background voxels.
    pub pos: f64,
    pub neg: f64,
    /// Probability of a flip, per axis.
    pub flip_p: f64,
    /// Probability of a rotation by 90, 180 or 270 degrees in the (0, 1) plane.
    pub rot90_p: f64,
}

impl CropOptions {
    pub fn reference(size: [usize; 3]) -> Self {
        Self { size, pos: 2.0, neg: 1.0, flip_p: 0.1, rot90_p: 0.1 }
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

/// Draws one crop of `case`. `fg`/`bg` are the case's foreground and background voxel indices
/// ([`Case::split_indices`]); the crop's HU are normalised with each of `intensities` after
/// cropping, one image each.
pub fn random_crop(
    case: &Case,
    fg: &[u32],
    bg: &[u32],
    intensities: &[&Intensity],
    o: &CropOptions,
    rng: &mut Rng,
) -> Crop {
    let dims = case.dims;
    let positive = !fg.is_empty() && (bg.is_empty() || rng.chance(o.pos / (o.pos + o.neg)));
    let pool = if positive { fg } else { bg };
    let centre = pool[rng.below(pool.len())] as usize;
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
        let (fg, bg) = case.split_indices();
        let o = CropOptions { size: [2, 2, 4], pos: 1.0, neg: 0.0, flip_p: 0.0, rot90_p: 0.0 };
        let mut rng = Rng::new(1);
        for _ in 0..10 {
            let crop = random_crop(&case, &fg, &bg, &[&IDENTITY], &o, &mut rng);
            assert_eq!(crop.labels.iter().filter(|&&l| l == 1).count(), 1, "{crop:?}");
            // Axis 2 has 2 voxels, the crop 4: the last two are padding.
            assert!(crop.images[0].chunks(4).all(|row| row[2] == 0.0 && row[3] == 0.0));
        }
    }
}
