//! Sliding-window inference as MONAI's `sliding_window_inference` computes it (non-buffered
//! path): padding to the ROI, window placement, the importance map, and the weighted average.

use std::borrow::Cow;

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
    pub fn pad<'a>(&self, input: &'a [f32]) -> Cow<'a, [f32]> {
        if self.working == self.size {
            return Cow::Borrowed(input);
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
        Cow::Owned(out)
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

/// The weighted average of window predictions, held only for the planes (first axis) that a
/// window still to come can touch. Windows arrive first axis slowest, so when one starts at
/// working plane `s`, every plane below `s` is final: it is divided by its summed weights,
/// cropped and handed on. A 96^3 ROI keeps at most 96 planes of class sums, where the whole
/// working volume (about 640 MB for 14 classes on a 512 x 512 x 400 CT at 1.5 x 1.5 x 2 mm) was
/// held before.
///
/// Per voxel the arithmetic is MONAI's, in its order: weights and weighted logits summed window
/// by window, then one division.
pub struct Accumulator {
    plan: WindowPlan,
    classes: usize,
    weights: Vec<f32>,
    /// Working plane of `planes[0]`.
    first: usize,
    planes: Vec<PlaneSums>,
    /// Windows added so far; they come in plan order.
    added: usize,
}

/// One working plane: class sums (`classes x w1 x w2`) and weight sums (`w1 x w2`).
struct PlaneSums {
    sums: Vec<f32>,
    count: Vec<f32>,
}

impl Accumulator {
    pub fn new(plan: WindowPlan, classes: usize, blend: Blend) -> Accumulator {
        debug_assert!(plan.starts.windows(2).all(|w| w[0][0] <= w[1][0]), "windows not first axis slowest");
        let weights = importance_map(plan.roi, blend);
        Accumulator { plan, classes, weights, first: 0, planes: Vec::new(), added: 0 }
    }

    /// Adds the plan's next window (`classes x roi` logits, C order), weighted by the importance
    /// map, and passes every plane that no later window touches to `done(plane, values)`: the
    /// plane's index in the unpadded volume and its averaged logits (`classes x size[1] x size[2]`).
    pub fn add(&mut self, logits: &[f32], done: &mut dyn FnMut(usize, Vec<f32>)) {
        let start = self.plan.starts[self.added];
        self.added += 1;
        self.emit_below(start[0], done);
        let [r0, r1, r2] = self.plan.roi;
        let [_, w1, w2] = self.plan.working;
        while self.first + self.planes.len() < start[0] + r0 {
            let count = self.plane_weights(self.first + self.planes.len());
            self.planes.push(PlaneSums { sums: vec![0f32; self.classes * w1 * w2], count });
        }
        let roi_len = r0 * r1 * r2;
        let offset = start[0] - self.first;
        let weights = &self.weights;
        self.planes[offset..offset + r0].par_iter_mut().enumerate().for_each(|(a, plane)| {
            for (c, sums) in plane.sums.chunks_exact_mut(w1 * w2).enumerate() {
                let pred = &logits[c * roi_len..(c + 1) * roi_len];
                for b in 0..r1 {
                    let (dst, src) = ((start[1] + b) * w2 + start[2], (a * r1 + b) * r2);
                    let terms = pred[src..src + r2].iter().zip(&weights[src..src + r2]);
                    sums[dst..dst + r2].iter_mut().zip(terms).for_each(|(acc, (p, w))| *acc += p * w);
                }
            }
        });
    }

    /// Passes the remaining planes on, once every window has been added.
    pub fn finish(mut self, done: &mut dyn FnMut(usize, Vec<f32>)) {
        assert_eq!(self.added, self.plan.starts.len(), "finished before its last window");
        self.emit_below(self.plan.working[0], done);
    }

    /// The summed importance weights of working plane `plane` over the windows that cover it,
    /// in window order, as MONAI sums its count map.
    fn plane_weights(&self, plane: usize) -> Vec<f32> {
        let [r0, r1, r2] = self.plan.roi;
        let [_, w1, w2] = self.plan.working;
        let mut count = vec![0f32; w1 * w2];
        for s in self.plan.starts.iter().filter(|s| (s[0]..s[0] + r0).contains(&plane)) {
            let a = plane - s[0];
            for b in 0..r1 {
                let (dst, src) = ((s[1] + b) * w2 + s[2], (a * r1 + b) * r2);
                count[dst..dst + r2].iter_mut().zip(&self.weights[src..src + r2]).for_each(|(n, w)| *n += w);
            }
        }
        count
    }

    /// Divides, crops and hands on the held planes below working plane `end`.
    fn emit_below(&mut self, end: usize, done: &mut dyn FnMut(usize, Vec<f32>)) {
        let finished = end.saturating_sub(self.first).min(self.planes.len());
        let [s0, s1, s2] = self.plan.size;
        let [_, w1, w2] = self.plan.working;
        let [p0, p1, p2] = self.plan.pad_before;
        for (i, PlaneSums { mut sums, count }) in self.planes.drain(..finished).enumerate() {
            let plane = self.first + i;
            if !(p0..p0 + s0).contains(&plane) {
                continue;
            }
            sums.par_chunks_mut(w1 * w2).for_each(|c| c.iter_mut().zip(&count).for_each(|(v, n)| *v /= n));
            if [w1, w2] != [s1, s2] {
                // Compact in place: every element moves to an index no greater than its own.
                for c in 0..self.classes {
                    for j in 0..s1 {
                        let src = c * w1 * w2 + (j + p1) * w2 + p2;
                        sums.copy_within(src..src + s2, (c * s1 + j) * s2);
                    }
                }
                sums.truncate(self.classes * s1 * s2);
            }
            done(plane - p0, sums);
        }
        self.first += finished;
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

    /// The averaged logits (`classes x size`, C order) of `window(start)` over the plan.
    fn average(plan: &WindowPlan, classes: usize, window: impl Fn([usize; 3]) -> Vec<f32>) -> Vec<f32> {
        let n: usize = plan.size.iter().product();
        let plane_len = plan.size[1] * plan.size[2];
        let mut out = vec![f32::NAN; classes * n];
        let mut next = 0;
        let mut put = |x: usize, values: Vec<f32>| {
            assert_eq!((x, values.len()), (next, classes * plane_len), "planes out of order or misshapen");
            next += 1;
            for (c, v) in values.chunks_exact(plane_len).enumerate() {
                out[c * n + x * plane_len..c * n + (x + 1) * plane_len].copy_from_slice(v);
            }
        };
        let mut acc = Accumulator::new(plan.clone(), classes, Blend::Gaussian);
        for &s in &plan.starts {
            acc.add(&window(s), &mut put);
        }
        acc.finish(&mut put);
        assert_eq!(next, plan.size[0]);
        out
    }

    #[test]
    fn windows_that_echo_their_input_give_back_the_input() {
        // Padded on two axes and tiled with overlap on the third.
        for size in [[5, 9, 3], [20, 9, 13]] {
            let plan = WindowPlan::new(size, [8, 8, 8], 0.5);
            let n: usize = size.iter().product();
            let input: Vec<f32> = (0..n).map(|v| ((v * 7919) % 1000) as f32 / 100.0).collect();
            let padded = plan.pad(&input);
            let out = average(&plan, 2, |s| {
                let mut window = vec![0f32; 512];
                plan.extract(&padded, s, &mut window);
                window.iter().copied().chain(window.iter().map(|v| 2.0 * v)).collect()
            });
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
        let roi_len = 512;
        let out = average(&plan, 2, |_| (0..2 * roi_len).map(|i| if i < roi_len { 1.5 } else { -2.0 }).collect());
        let n = 20 * 9 * 13;
        assert!(out[..n].iter().all(|v| (v - 1.5).abs() < 1e-5));
        assert!(out[n..].iter().all(|v| (v + 2.0).abs() < 1e-5));
    }

    #[test]
    fn plane_by_plane_equals_the_whole_volume_sums_bit_for_bit() {
        // MONAI's form: whole-volume sums of weights and weighted logits in window order, one
        // division, then the crop. Padded on the first and last axes, several windows deep on all.
        for (size, roi) in [([29, 17, 6], [8, 6, 8]), ([6, 23, 19], [8, 8, 5])] {
            let plan = WindowPlan::new(size, roi, 0.6);
            let classes = 3;
            let roi_len: usize = roi.iter().product();
            let logits = |s: [usize; 3]| -> Vec<f32> {
                (0..classes * roi_len)
                    .map(|i| (((i + 31 * s[0] + 7 * s[1] + s[2]) * 7919 % 2003) as f32).sin())
                    .collect()
            };
            let weights = importance_map(roi, Blend::Gaussian);
            let [w0, w1, w2] = plan.working;
            let mut sums = vec![0f32; classes * w0 * w1 * w2];
            let mut count = vec![0f32; w0 * w1 * w2];
            for &s in &plan.starts {
                let l = logits(s);
                for (i, &w) in weights.iter().enumerate() {
                    let (a, b, c) = (i / (roi[1] * roi[2]), i / roi[2] % roi[1], i % roi[2]);
                    let v = ((s[0] + a) * w1 + s[1] + b) * w2 + s[2] + c;
                    count[v] += w;
                    for k in 0..classes {
                        sums[k * w0 * w1 * w2 + v] += l[k * roi_len + i] * w;
                    }
                }
            }
            let out = average(&plan, classes, logits);
            let [p0, p1, p2] = plan.pad_before;
            let mut expected = Vec::new();
            for k in 0..classes {
                for x in 0..size[0] {
                    for y in 0..size[1] {
                        for z in 0..size[2] {
                            let v = ((x + p0) * w1 + y + p1) * w2 + z + p2;
                            expected.push(sums[k * w0 * w1 * w2 + v] / count[v]);
                        }
                    }
                }
            }
            assert!(plan.pad_before.iter().any(|&p| p > 0) && plan.starts.len() > 4, "{plan:?}");
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{size:?}"
            );
        }
    }
}
