//! The intensity transform from HU to network input, in float32 as MONAI applies it.

use prosam_models::format::Intensity;
use rayon::prelude::*;

/// Applies `intensity` in place.
pub fn apply(intensity: &Intensity, data: &mut [f32]) {
    match *intensity {
        Intensity::ScaleWindow { a_min, a_max, b_min, b_max, clip } => {
            // ScaleIntensityRange: (x - a_min) / (a_max - a_min), then * (b_max - b_min) + b_min, then clip.
            let (a0, span, b0, b_span) = (a_min as f32, (a_max - a_min) as f32, b_min as f32, (b_max - b_min) as f32);
            let (lo, hi) = (b_min.min(b_max) as f32, b_min.max(b_max) as f32);
            data.par_iter_mut().for_each(|v| {
                let y = (*v - a0) / span * b_span + b0;
                *v = if clip { y.clamp(lo, hi) } else { y };
            });
        }
        Intensity::ClipZScore { lower, upper, mean, std } => {
            let (lo, hi, m, s) = (lower as f32, upper as f32, mean as f32, std as f32);
            data.par_iter_mut().for_each(|v| *v = (v.clamp(lo, hi) - m) / s);
        }
    }
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
