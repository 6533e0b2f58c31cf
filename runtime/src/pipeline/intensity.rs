//! The intensity transform from HU to network input, in float32 as MONAI applies it.

use prosam_models::format::Intensity;
use rayon::prelude::*;

/// Applies `intensity` in place.
pub fn apply(intensity: &Intensity, data: &mut [f32]) {
    let map = intensity.map_f32();
    data.par_iter_mut().for_each(|v| *v = map(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btcv_window() {
        let mut v = vec![-1000.0, -175.0, 37.5, 250.0, 3000.0];
        apply(&Intensity::btcv(), &mut v);
        assert_eq!(v, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
        let mut z = vec![-2000.0, 100.0, 5000.0];
        apply(&Intensity::ClipZScore { lower: -1000.0, upper: 1000.0, mean: 100.0, std: 50.0 }, &mut z);
        assert_eq!(z, vec![-22.0, 0.0, 18.0]);
    }
}
