//! Sliding-window inference as MONAI's `sliding_window_inference` computes it (non-buffered
//! path): padding to the ROI, window placement, the importance map, and the weighted average.

use rayon::prelude::*;

/// How overlapping windows are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blend {
    /// Every voxel of a window weighs the same.
    Constant,
    /// A Gaussian centred on the window (sigma = 0.125 ROI), floored at its minimum or 1e-3.
    #[default]
    Gaussian,
}

impl std::str::FromStr for Blend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Blend::Constant),
            "gaussian" => Ok(Blend::Gaussian),
            other => Err(format!("unknown blend `{other}` (expected gaussian or constant)")),
        }
    }
}

/// MONAI's sigma scale for the Gaussian importance map.
pub const SIGMA_SCALE: f32 = 0.125;

/// Where the windows go on a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPlan {
    pub size: [usize; 3],
    pub roi: [usize; 3],
    /// The volume padded to at least the ROI (constant 0).
    pub working: [usize; 3],
    pub pad_before: [usize; 3],
    /// Window origins in the working volume, first axis slowest.
    pub starts: Vec<[usize; 3]>,
}

impl WindowPlan {
    /// MONAI's padding, scan interval and `dense_patch_slices` for `overlap` in [0, 1).
    pub fn new(size: [usize; 3], roi: [usize; 3], overlap: f64) -> WindowPlan {
        let working = [0, 1, 2].map(|a| size[a].max(roi[a]));
        let pad_before = [0, 1, 2].map(|a| (working[a] - size[a]) / 2);
        let per_axis: Vec<Vec<usize>> = (0..3)
            .map(|a| {
                let stride =
                    if roi[a] == working[a] { roi[a] } else { ((roi[a] as f64 * (1.0 - overlap)) as usize).max(1) };
                let num = working[a].div_ceil(stride);
                let count = (0..num).find(|d| d * stride + roi[a] >= working[a]).map_or(1, |d| d + 1);
                (0..count).map(|i| i * stride - (i * stride + roi[a]).saturating_sub(working[a])).collect()
            })
            .collect();
        let mut starts = Vec::new();
        for &x in &per_axis[0] {
            for &y in &per_axis[1] {
                for &z in &per_axis[2] {
                    starts.push([x, y, z]);
                }
            }
        }
        WindowPlan { size, roi, working, pad_before, starts }
    }

    /// `input` (C order, `size`) zero-padded to the working size.
    pub fn pad(&self, input: &[f32]) -> Vec<f32> {
        if self.working == self.size {
            return input.to_vec();
        }
        let [w0, w1, w2] = self.working;
        let [s0, s1, s2] = self.size;
        let [p0, p1, p2] = self.pad_before;
        let mut out = vec![0f32; w0 * w1 * w2];
        for i in 0..s0 {
            for j in 0..s1 {
                let dst = ((i + p0) * w1 + j + p1) * w2 + p2;
                out[dst..dst + s2].copy_from_slice(&input[(i * s1 + j) * s2..(i * s1 + j + 1) * s2]);
            }
        }
        out
    }

    /// Copies window `start` of the padded volume into `dst` (ROI-sized, C order).
    pub fn extract(&self, padded: &[f32], start: [usize; 3], dst: &mut [f32]) {
        let [r0, r1, r2] = self.roi;
        let [_, w1, w2] = self.working;
        for a in 0..r0 {
            for b in 0..r1 {
                let src = ((start[0] + a) * w1 + start[1] + b) * w2 + start[2];
                dst[(a * r1 + b) * r2..(a * r1 + b + 1) * r2].copy_from_slice(&padded[src..src + r2]);
            }
        }
    }
}

/// MONAI's importance map for `roi`, float32, C order.
pub fn importance_map(roi: [usize; 3], blend: Blend) -> Vec<f32> {
    let n: usize = roi.iter().product();
    let mut w = match blend {
        Blend::Constant => vec![1f32; n],
        Blend::Gaussian => {
            let g: Vec<Vec<f32>> = roi
                .iter()
                .map(|&r| {
                    let sigma = SIGMA_SCALE * r as f32;
                    (0..r)
                        .map(|i| {
                            let x = -((r as f32 - 1.0) / 2.0) + i as f32;
                            (x * x / (-2.0 * sigma * sigma)).exp()
                        })
                        .collect()
                })
                .collect();
            let mut w = Vec::with_capacity(n);
            for &a in &g[0] {
                for &b in &g[1] {
                    let ab = a * b;
                    w.extend(g[2].iter().map(|&c| ab * c));
                }
            }
            w
        }
    };
    let floor = w.iter().cloned().fold(f32::INFINITY, f32::min).max(1e-3);
    w.iter_mut().for_each(|v| *v = v.max(floor));
    w
}

/// The weighted average of window predictions over the working volume.
pub struct Accumulator {
    plan: WindowPlan,
    classes: usize,
    weights: Vec<f32>,
    out: Vec<f32>,
    count: Vec<f32>,
}

impl Accumulator {
    /// Sums the importance weights of every window, in window order, as MONAI does up front.
    pub fn new(plan: WindowPlan, classes: usize, blend: Blend) -> Accumulator {
        let weights = importance_map(plan.roi, blend);
        let voxels: usize = plan.working.iter().product();
        let mut count = vec![0f32; voxels];
        for &s in &plan.starts {
            add_window(&mut count, &weights, &plan, s, |acc, w| *acc += w);
        }
        Accumulator { out: vec![0f32; classes * voxels], plan, classes, weights, count }
    }

    /// Adds one window's logits (`classes x roi`, C order), weighted by the importance map.
    pub fn add(&mut self, start: [usize; 3], logits: &[f32]) {
        let roi_len: usize = self.plan.roi.iter().product();
        let voxels: usize = self.plan.working.iter().product();
        let (plan, weights) = (&self.plan, &self.weights);
        self.out.par_chunks_mut(voxels).zip(logits.par_chunks(roi_len)).for_each(|(out_c, pred_c)| {
            let mut k = 0;
            add_window(out_c, weights, plan, start, |acc, w| {
                *acc += pred_c[k] * w;
                k += 1;
            });
        });
    }

    /// Divides by the summed weights, crops the padding and returns `classes x size` (C order),
    /// reusing the accumulator's memory: there is never a second class-score volume.
    pub fn finish(self) -> Vec<f32> {
        let Accumulator { plan, classes, mut out, count, .. } = self;
        let [s0, s1, s2] = plan.size;
        let [_, w1, w2] = plan.working;
        let [p0, p1, p2] = plan.pad_before;
        let voxels: usize = plan.working.iter().product();
        out.par_chunks_mut(voxels).for_each(|c| c.iter_mut().zip(&count).for_each(|(v, n)| *v /= n));
        if plan.working != plan.size {
            // Compact in place: every element moves to an index no greater than its own, in order.
            let size = s0 * s1 * s2;
            for c in 0..classes {
                for i in 0..s0 {
                    for j in 0..s1 {
                        let src = c * voxels + ((i + p0) * w1 + j + p1) * w2 + p2;
                        out.copy_within(src..src + s2, c * size + (i * s1 + j) * s2);
                    }
                }
            }
            out.truncate(classes * size);
            out.shrink_to_fit();
        }
        out
    }
}

/// Visits the voxels of window `start` in ROI order with their accumulator slot and weight.
fn add_window(
    acc: &mut [f32],
    weights: &[f32],
    plan: &WindowPlan,
    start: [usize; 3],
    mut f: impl FnMut(&mut f32, f32),
) {
    let [r0, r1, r2] = plan.roi;
    let [_, w1, w2] = plan.working;
    for a in 0..r0 {
        for b in 0..r1 {
            let dst = ((start[0] + a) * w1 + start[1] + b) * w2 + start[2];
            let wrow = &weights[(a * r1 + b) * r2..(a * r1 + b + 1) * r2];
            for (slot, &w) in acc[dst..dst + r2].iter_mut().zip(wrow) {
                f(slot, w);
            }
        }
    }
}

/// Softmax over the class axis of `classes x voxels` logits, in place.
pub fn softmax_classes(values: &mut [f32], classes: usize) {
    let voxels = values.len() / classes;
    let chunk = 4096;
    // Work on voxel ranges in parallel; classes are strided by `voxels`.
    let ptr = SharedMut(values.as_mut_ptr());
    (0..voxels.div_ceil(chunk)).into_par_iter().for_each(|block| {
        let p = &ptr;
        for v in block * chunk..((block + 1) * chunk).min(voxels) {
            // SAFETY: each block touches only its own voxels v (at offsets c * voxels + v).
            unsafe {
                let mut max = f32::NEG_INFINITY;
                for c in 0..classes {
                    max = max.max(*p.0.add(c * voxels + v));
                }
                let mut total = 0f32;
                for c in 0..classes {
                    let e = (*p.0.add(c * voxels + v) - max).exp();
                    *p.0.add(c * voxels + v) = e;
                    total += e;
                }
                for c in 0..classes {
                    *p.0.add(c * voxels + v) /= total;
                }
            }
        }
    });
}

struct SharedMut(*mut f32);
// SAFETY: used only by `softmax_classes`, whose tasks write disjoint elements.
unsafe impl Sync for SharedMut {}
unsafe impl Send for SharedMut {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_from_the_spec() {
        let p = WindowPlan::new([243, 201, 44], [96; 3], 0.5);
        assert_eq!(p.working, [243, 201, 96]);
        assert_eq!(p.pad_before, [0, 0, 26]);
        assert_eq!(p.starts.len(), 20);
        assert_eq!(p.starts[..5].iter().map(|s| s[1]).collect::<Vec<_>>(), vec![0, 48, 96, 105, 0]);
        assert_eq!(p.starts.iter().step_by(4).map(|s| s[0]).collect::<Vec<_>>(), vec![0, 48, 96, 144, 147]);
        let axis = |p: &WindowPlan, a: usize| {
            let mut v: Vec<usize> = p.starts.iter().map(|s| s[a]).collect();
            v.dedup();
            v.sort();
            v.dedup();
            v
        };
        let q = WindowPlan::new([243, 201, 168], [96; 3], 0.25);
        assert_eq!((axis(&q, 0), axis(&q, 1), axis(&q, 2)), (vec![0, 72, 144, 147], vec![0, 72, 105], vec![0, 72]));
        let r = WindowPlan::new([256, 256, 160], [96; 3], 0.5);
        assert_eq!((axis(&r, 0), axis(&r, 2), r.starts.len()), (vec![0, 48, 96, 144, 160], vec![0, 48, 64], 75));
    }

    #[test]
    fn gaussian_map_is_floored() {
        let w = importance_map([96; 3], Blend::Gaussian);
        let floored = w.iter().filter(|&&v| v == 1e-3).count();
        assert_eq!(floored, 512_888);
        let peak = w.iter().cloned().fold(0f32, f32::max);
        assert!((peak - 0.99740).abs() < 1e-5, "{peak}");
    }

    #[test]
    fn windows_that_echo_their_input_give_back_the_input() {
        // Padded on two axes and tiled with overlap on the third.
        for size in [[5, 9, 3], [20, 9, 13]] {
            let plan = WindowPlan::new(size, [8, 8, 8], 0.5);
            let n: usize = size.iter().product();
            let input: Vec<f32> = (0..n).map(|v| ((v * 7919) % 1000) as f32 / 100.0).collect();
            let padded = plan.pad(&input);
            let mut acc = Accumulator::new(plan.clone(), 2, Blend::Gaussian);
            let mut window = vec![0f32; 512];
            for &s in &plan.starts {
                plan.extract(&padded, s, &mut window);
                let logits: Vec<f32> = window.iter().copied().chain(window.iter().map(|v| 2.0 * v)).collect();
                acc.add(s, &logits);
            }
            let out = acc.finish();
            assert_eq!(out.len(), 2 * n);
            for v in 0..n {
                assert!(
                    (out[v] - input[v]).abs() < 1e-4 && (out[n + v] - 2.0 * input[v]).abs() < 1e-4,
                    "{size:?} voxel {v}"
                );
            }
        }
    }

    #[test]
    fn overlapping_windows_average_to_the_prediction() {
        // A constant prediction per class must come back unchanged whatever the weights.
        let plan = WindowPlan::new([20, 9, 13], [8, 8, 8], 0.5);
        let mut acc = Accumulator::new(plan.clone(), 2, Blend::Gaussian);
        let roi_len = 512;
        let logits: Vec<f32> = (0..2 * roi_len).map(|i| if i < roi_len { 1.5 } else { -2.0 }).collect();
        for &s in &plan.starts {
            acc.add(s, &logits);
        }
        let out = acc.finish();
        let n = 20 * 9 * 13;
        assert!(out[..n].iter().all(|v| (v - 1.5).abs() < 1e-5));
        assert!(out[n..].iter().all(|v| (v + 2.0).abs() < 1e-5));
    }
}
