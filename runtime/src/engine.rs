//! `Segmenter`: a loaded model and the pipeline options; what the CLI and the C ABI call.
//!
//! The way of a CT: stored grid -> RAS orientation (an index view, no copy) -> resampling to the
//! model spacing -> intensity transform -> sliding windows -> softmax -> probabilities mapped back
//! to the CT's grid slab by slab -> argmax, with the orientation undone as labels are written.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use prosam_models::format::{Architecture, Metadata, ModelFile};
use prosam_models::network::Network;

use crate::device::{DeviceChoice, compute_dtype};
use crate::memory::{self, VolumeShape};
use crate::pipeline::sliding_window::{Accumulator, softmax_classes};
use crate::pipeline::{Blend, WindowPlan, intensity};
use crate::volume::resample::{LabelRestore, MAX_HELD_PLANES, resample_view, resampled_size};
use crate::volume::{Affine, Orientation, Volume};
use crate::{Error, Result};

/// What a process holds besides its data: code, thread stacks, the allocator's arenas (measured
/// at 20 to 40 MiB for `prosam segment`).
const PROCESS_OVERHEAD_BYTES: u64 = 64 << 20;

/// Sliding-window settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentOptions {
    /// Fraction of a window shared with its neighbour along each axis, in [0, 1).
    pub overlap: f64,
    pub blend: Blend,
    /// Windows per forward pass.
    pub batch: usize,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self { overlap: 0.5, blend: Blend::Gaussian, batch: 1 }
    }
}

impl SegmentOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(Error::Options(format!("overlap {} is not in [0, 1)", self.overlap)));
        }
        if self.batch == 0 {
            return Err(Error::Options("the window batch must be at least 1".into()));
        }
        Ok(())
    }
}

/// The CT on the model's grid, ready for the network, with the geometry to map results back.
#[derive(Debug, Clone)]
pub struct ModelGrid {
    /// Network input, C order (axis 0 slowest), `dims`.
    pub data: Vec<f32>,
    pub dims: [usize; 3],
    /// Affine of the model grid (oriented onto the model's axis codes, model spacing).
    pub affine: Affine,
    /// The stored grid's size and how the oriented grid indexes it.
    pub stored_dims: [usize; 3],
    pub orientation: Orientation,
    /// Oriented voxel size over model voxel size, per oriented axis.
    pub oriented_over_model: [f64; 3],
}

/// Wall time of each stage of [`Segmenter::segment`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub preprocess: Duration,
    pub infer: Duration,
    pub restore: Duration,
}

/// A label map on the input's stored grid (`data[i + nx * (j + ny * k)]`).
#[derive(Debug, Clone)]
pub struct Segmentation {
    pub labels: Vec<u8>,
    pub dims: [usize; 3],
    pub windows: usize,
    pub times: StageTimes,
}

/// A loaded network (a student, or the teacher) and the options it segments with.
pub struct Segmenter {
    net: Network,
    metadata: Metadata,
    device: Device,
    /// What the network computes in ([`compute_dtype`]).
    dtype: DType,
    options: SegmentOptions,
    /// The weights as computed with, plus the mapped file: what the model holds for its lifetime.
    weights_bytes: u64,
}

impl Segmenter {
    /// Loads a model file (checksum verified) for CPU inference.
    pub fn load(model: &Path, options: SegmentOptions) -> Result<Self> {
        Self::load_on(model, options, DeviceChoice::Cpu, None)
    }

    /// Loads a model file for inference on `device`, computing in `dtype` (default: what
    /// [`compute_dtype`] gives for the file's precision there).
    pub fn load_on(model: &Path, options: SegmentOptions, device: DeviceChoice, dtype: Option<DType>) -> Result<Self> {
        Self::from_file(ModelFile::open(model)?, options, device, dtype)
    }

    /// A model file already opened (or built in, [`crate::zoo`]) for inference on `device`.
    pub fn from_file(
        file: ModelFile,
        options: SegmentOptions,
        device: DeviceChoice,
        dtype: Option<DType>,
    ) -> Result<Self> {
        options.validate()?;
        let device = device.open()?;
        let dtype = dtype.unwrap_or_else(|| compute_dtype(&device, file.metadata().precision));
        let net = file.network(dtype, &device)?;
        let elements: usize = file.tensor_infos()?.iter().map(|(_, _, shape)| shape.iter().product::<usize>()).sum();
        let weights_bytes = (elements * dtype.size_in_bytes() + file.file_size()) as u64;
        Ok(Self { net, metadata: file.metadata().clone(), device, dtype, options, weights_bytes })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn options(&self) -> &SegmentOptions {
        &self.options
    }

    /// The same model with other options; the weights are shared, not copied.
    pub fn with_options(&self, options: SegmentOptions) -> Segmenter {
        Segmenter {
            net: self.net.clone(),
            metadata: self.metadata.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            options,
            weights_bytes: self.weights_bytes,
        }
    }

    /// An upper estimate of the bytes a whole run on a volume of `shape` holds at its peak: the
    /// read, [`Segmenter::segment`], postprocessing and writing the labels, with the weights.
    /// Computed from the header alone, so that a run that cannot fit is refused before it
    /// allocates.
    pub fn memory_need(&self, shape: &VolumeShape) -> u64 {
        let (_, _, model_dims) = model_grid_of(&self.metadata, &shape.affine, shape.dims);
        let model_dims = model_dims.map(|d| d as u64);
        let roi = self.metadata.roi_size.map(|r| r as u64);
        let stored = shape.voxels();
        let model: u64 = model_dims.iter().fold(1, |a, &d| a.saturating_mul(d));
        let classes = self.metadata.labels.len() as u64;
        let f32s = |n: u64| memory::bytes_of(n, 4);
        let product = |v: &[u64]| v.iter().fold(1, |a: u64, &b| a.saturating_mul(b));
        // A batch is never larger than the windows there are.
        let batch = (self.options.batch as u64).min(window_count(model_dims, roi, self.options.overlap));
        let roi_voxels = product(&roi).saturating_mul(batch);
        let preprocess = f32s(stored).saturating_add(f32s(model));
        let network = match &self.metadata.architecture {
            // Its logits twice (tensor and copy) and the activations, measured at 20 + 8 *
            // feature_size float32 ROI volumes (fs 12: 114, fs 24: 208) and counted as 24 + 10 *
            // feature_size for the allocator's slack.
            Architecture::SwinUnetr(config) => {
                f32s(roi_voxels.saturating_mul(24 + 2 * classes + 10 * config.feature_size as u64))
            }
            // Crop by crop: the logits of the batch, and one crop's working set.
            Architecture::AutoProSam(config) => {
                f32s(roi_voxels.saturating_mul(2 * classes)).saturating_add(f32s(teacher_activation_floats(config)))
            }
        };
        // While the windows run: the grid (and its padded copy where the grid is smaller than the
        // ROI), the accumulator's planes (class and weight sums over one ROI's depth of the
        // working grid), the model planes the label restore holds, the labels and one batch of
        // windows through the network.
        let working: [u64; 3] = [0, 1, 2].map(|a| model_dims[a].max(roi[a]));
        let padded_copy = if working == model_dims { 0 } else { product(&working) };
        let slab = product(&[classes + 1, roi[0].min(working[0]), working[1], working[2]]);
        let restore_planes = product(&[classes, MAX_HELD_PLANES as u64, model_dims[1], model_dims[2]]);
        let infer = f32s(model.saturating_add(padded_copy).saturating_add(slab).saturating_add(restore_planes))
            .saturating_add(stored)
            .saturating_add(network);
        // Cleaning works on runs along x: about 21 bytes per run of the organ and 13 per run of
        // the rest of its box, besides the labels. Counted as a run every 7 voxels over the whole
        // volume (an organ has a few runs per row of its box); this is not a bound: a checkerboard
        // label map would need about 17 bytes per voxel.
        let postprocess = stored.saturating_mul(1 + 5);
        let stages = [shape.read_bytes, preprocess, infer, postprocess, shape.read_bytes.saturating_add(stored)];
        let peak = stages.into_iter().max().unwrap_or(0);
        peak.saturating_add(self.weights_bytes).saturating_add(PROCESS_OVERHEAD_BYTES)
    }

    /// Orientation to RAS, resampling to the model spacing and the intensity transform.
    pub fn preprocess(&self, volume: &Volume) -> Result<ModelGrid> {
        let mut grid = to_model_grid(&self.metadata, volume);
        intensity::apply(&self.metadata.intensity, &mut grid.data);
        Ok(grid)
    }

    /// Sliding-window inference and softmax: class probabilities on the model grid
    /// (`classes x dims`, C order). `progress(done, total)` is called before the first window and
    /// after every batch; returning `false` cancels the run with [`Error::Cancelled`].
    pub fn probabilities(&self, grid: &ModelGrid, progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Vec<f32>> {
        let forward = |x: &Tensor| -> Result<Tensor> { Ok(self.net.forward_checked(x)?) };
        self.window_inference().probabilities(&forward, &grid.data, grid.dims, &self.device, self.dtype, progress)
    }

    /// The same probabilities handed to `plane(x, values)` one model plane (first axis) at a
    /// time, in order, as the sliding window finishes them; see
    /// [`WindowInference::probability_planes`].
    pub fn probability_planes(
        &self,
        grid: &ModelGrid,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        plane: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()> {
        let forward = |x: &Tensor| -> Result<Tensor> { Ok(self.net.forward_checked(x)?) };
        let window = self.window_inference();
        window.probability_planes(&forward, &grid.data, grid.dims, &self.device, self.dtype, progress, plane)
    }

    /// A restore of `grid`'s model planes into `labels` (the stored grid, x fastest).
    pub fn label_restore<'a>(&self, grid: &ModelGrid, labels: &'a mut [u8]) -> LabelRestore<'a> {
        let stored = grid.stored_dims;
        let oriented_dims = grid.orientation.oriented_dims(stored);
        let (base, strides) = grid.orientation.view(stored, [1, stored[0], stored[0] * stored[1]]);
        let classes = self.metadata.labels.len();
        LabelRestore::new(classes, grid.dims, oriented_dims, grid.oriented_over_model, labels, base, strides)
    }

    fn window_inference(&self) -> WindowInference {
        WindowInference { roi: self.metadata.roi_size, classes: self.metadata.labels.len(), options: self.options }
    }

    /// Labels on the stored grid from model-grid probabilities held whole.
    pub fn restore(&self, grid: &ModelGrid, probs: &[f32]) -> Vec<u8> {
        let mut labels = vec![0u8; grid.stored_dims.iter().product()];
        self.label_restore(grid, &mut labels).restore_all(probs);
        labels
    }

    /// The whole pipeline. The volume is consumed so that its voxels are freed once resampled;
    /// labels are filled in as the sliding window finishes model planes, so the class
    /// probabilities of the whole grid are never held.
    /// A volume with a NaN or an infinite value is refused ([`Error::NonFinite`]).
    pub fn segment(&self, volume: Volume, progress: &mut dyn FnMut(usize, usize) -> bool) -> Result<Segmentation> {
        if let Some(bad) = volume.non_finite() {
            return Err(Error::NonFinite(format!("the volume holds {bad}")));
        }
        let t0 = Instant::now();
        let dims = volume.dims;
        let grid = self.preprocess(&volume)?;
        drop(volume);
        let t1 = Instant::now();
        let voxels: usize = dims.iter().product();
        let mut labels = Vec::new();
        labels.try_reserve_exact(voxels).map_err(|_| Error::Allocation {
            what: format!("the {} x {} x {} label map", dims[0], dims[1], dims[2]),
            bytes: voxels as u64,
        })?;
        labels.resize(voxels, 0u8);
        let mut restore = self.label_restore(&grid, &mut labels);
        let mut restoring = Duration::ZERO;
        self.probability_planes(&grid, progress, &mut |x, p| {
            let t = Instant::now();
            restore.push(x, p);
            restoring += t.elapsed();
        })?;
        let t = Instant::now();
        restore.finish();
        restoring += t.elapsed();
        let windows = WindowPlan::new(grid.dims, self.metadata.roi_size, self.options.overlap).starts.len();
        drop(grid);
        crate::resources::release_freed_memory();
        let times = StageTimes { preprocess: t1 - t0, infer: t1.elapsed() - restoring, restore: restoring };
        Ok(Segmentation { labels, dims, windows, times })
    }
}

/// An upper bound on the sliding windows over a grid of `dims` (MONAI's placement: windows
/// `roi * (1 - overlap)` apart, at least one voxel, the last one flush with the end), saturating.
fn window_count(dims: [u64; 3], roi: [u64; 3], overlap: f64) -> u64 {
    (0..3)
        .map(|a| {
            let step = ((roi[a] as f64 * (1.0 - overlap)) as u64).max(1);
            dims[a].saturating_sub(roi[a]).div_ceil(step) + 1
        })
        .fold(1, u64::saturating_mul)
}

/// An upper estimate of the f32 values the teacher holds at once for one crop without a gradient
/// graph: the crop up-sampled along two axes, one block's token tensors (input, adapter, norm,
/// q/k/v, attention and projection outputs: 8 token-sized tensors, and the MLP's hidden layer
/// before and after its GELU) and a chunk of attention scores with their softmax, and the
/// decoder's concatenation, classifier and logits.
fn teacher_activation_floats(cfg: &prosam_models::autoprosam::Config) -> u64 {
    let (crop, t) = (cfg.crop as u64, cfg.token_grid() as u64);
    let upsampled = crop * (cfg.upsample as u64 * crop).pow(2);
    let tokens = t.pow(3) * cfg.embed_dim as u64 * (8 + 2 * cfg.mlp_ratio as u64);
    let n = (cfg.cubic_window as u64).pow(3);
    let scores = (t.pow(3) / n * cfg.num_heads as u64 * n * n).min(1 << 25) * 2;
    let h = cfg.decoder_channels as u64;
    let decoder = (2 * t).pow(3) * (2 * (4 * h + 1) + h) + crop.pow(3) * 2 * cfg.n_out as u64;
    upsampled + tokens + scores + decoder
}

/// How a stored grid maps onto `metadata`'s model grid: the orientation onto the model's axis
/// codes (RAS for MONAI's BTCV models), the oriented affine, and the model grid's size (MONAI's
/// `Spacing` rounding).
pub fn model_grid_of(metadata: &Metadata, affine: &Affine, stored: [usize; 3]) -> (Orientation, Affine, [usize; 3]) {
    // The metadata's codes were validated when the model file was read.
    let orientation =
        Orientation::to_codes(affine, &metadata.axis_codes).unwrap_or_else(|| Orientation::to_ras(affine));
    let oriented_dims = orientation.oriented_dims(stored);
    let oriented_affine = orientation.oriented_affine(affine, stored);
    let (old, new) = (oriented_affine.spacing(), metadata.spacing);
    let dims = [0, 1, 2].map(|a| resampled_size(oriented_dims[a], old[a], new[a]));
    (orientation, oriented_affine, dims)
}

/// A volume on `metadata`'s grid, still in HU: orientation onto its axis codes, then trilinear resampling to
/// the model spacing. The intensity transform is the caller's ([`intensity::apply`]), so that
/// training can crop in HU and let each network normalise its own way.
pub fn to_model_grid(metadata: &Metadata, volume: &Volume) -> ModelGrid {
    let (orientation, oriented_affine, dims) = model_grid_of(metadata, &volume.affine, volume.dims);
    let oriented_dims = orientation.oriented_dims(volume.dims);
    let old = oriented_affine.spacing();
    let new = metadata.spacing;
    let (base, strides) = orientation.view(volume.dims, volume.strides());
    let data = resample_view(&volume.data, base, strides, oriented_dims, dims, [0, 1, 2].map(|a| new[a] / old[a]));
    ModelGrid {
        data,
        dims,
        affine: oriented_affine.scale_columns([0, 1, 2].map(|a| new[a] / old[a])),
        stored_dims: volume.dims,
        orientation,
        oriented_over_model: [0, 1, 2].map(|a| old[a] / new[a]),
    }
}

/// A label map (stored as a volume of label numbers) on `metadata`'s grid: orientation onto its axis codes,
/// then nearest-neighbour resampling to the model spacing (MONAI's `Spacingd` with
/// `mode="nearest"` for labels), C order.
pub fn labels_to_model_grid(metadata: &Metadata, labels: &Volume) -> (Vec<u8>, [usize; 3]) {
    let (orientation, oriented_affine, dims) = model_grid_of(metadata, &labels.affine, labels.dims);
    let oriented_dims = orientation.oriented_dims(labels.dims);
    let old = oriented_affine.spacing();
    let ratio = [0, 1, 2].map(|a| metadata.spacing[a] / old[a]);
    let (base, strides) = orientation.view(labels.dims, labels.strides());
    let nearest = |a: usize, j: usize| ((j as f64 * ratio[a]).round_ties_even() as usize).min(oriented_dims[a] - 1);
    let mut out = vec![0u8; dims.iter().product()];
    for (x, plane) in out.chunks_mut(dims[1] * dims[2]).enumerate() {
        let ix = nearest(0, x);
        for (y, row) in plane.chunks_mut(dims[2]).enumerate() {
            let iy = nearest(1, y);
            for (z, v) in row.iter_mut().enumerate() {
                let iz = nearest(2, z);
                let off =
                    base as isize + ix as isize * strides[0] + iy as isize * strides[1] + iz as isize * strides[2];
                *v = labels.data[off as usize].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    (out, dims)
}

/// Sliding-window inference over a model grid with any forward function: MONAI's
/// `sliding_window_inference` then a softmax over the classes. Shared by [`Segmenter`] and
/// training's validation.
#[derive(Debug, Clone, Copy)]
pub struct WindowInference {
    pub roi: [usize; 3],
    pub classes: usize,
    pub options: SegmentOptions,
}

impl WindowInference {
    /// Class probabilities (`classes x dims`, C order) of the network input `data` (`dims`, C
    /// order). `progress(done, total)` is called before the first window and after every batch;
    /// returning `false` cancels the run with [`Error::Cancelled`].
    pub fn probabilities(
        &self,
        forward: &dyn Fn(&Tensor) -> Result<Tensor>,
        data: &[f32],
        dims: [usize; 3],
        device: &Device,
        dtype: DType,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<f32>> {
        let voxels: usize = dims.iter().product();
        let plane_len = dims[1] * dims[2];
        let mut probs = vec![0f32; self.classes * voxels];
        self.probability_planes(forward, data, dims, device, dtype, progress, &mut |x, plane| {
            for (c, values) in plane.chunks_exact(plane_len).enumerate() {
                probs[c * voxels + x * plane_len..c * voxels + (x + 1) * plane_len].copy_from_slice(values);
            }
        })?;
        Ok(probs)
    }

    /// The same probabilities plane by plane along the first axis, in order, as the windows
    /// finish them: `plane(x, values)` gets `classes x dims[1] x dims[2]` values. Only the planes
    /// that windows still to come can touch are held (see [`Accumulator`]).
    #[allow(clippy::too_many_arguments)]
    pub fn probability_planes(
        &self,
        forward: &dyn Fn(&Tensor) -> Result<Tensor>,
        data: &[f32],
        dims: [usize; 3],
        device: &Device,
        dtype: DType,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        plane: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()> {
        let (roi, classes, batch_size) = (self.roi, self.classes, self.options.batch);
        let plan = WindowPlan::new(dims, roi, self.options.overlap);
        let padded = plan.pad(data);
        let starts = plan.starts.clone();
        let mut acc = Accumulator::new(plan.clone(), classes, self.options.blend);
        let mut done = |x: usize, mut values: Vec<f32>| {
            softmax_classes(&mut values, classes);
            plane(x, values);
        };
        let roi_len: usize = roi.iter().product();
        if !progress(0, starts.len()) {
            return Err(Error::Cancelled);
        }
        for (b, batch) in starts.chunks(batch_size).enumerate() {
            let mut input = vec![0f32; batch.len() * roi_len];
            for (w, &s) in batch.iter().enumerate() {
                plan.extract(&padded, s, &mut input[w * roi_len..(w + 1) * roi_len]);
            }
            let x = Tensor::from_vec(input, (batch.len(), 1, roi[0], roi[1], roi[2]), device)?.to_dtype(dtype)?;
            let logits = forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for window in logits.chunks_exact(classes * roi_len) {
                acc.add(window, &mut done);
            }
            if !progress((b * batch_size + batch.len()).min(starts.len()), starts.len()) {
                return Err(Error::Cancelled);
            }
        }
        acc.finish(&mut done);
        Ok(())
    }
}
