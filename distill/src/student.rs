//! Knowledge distillation (`../shared/spec/teacher.md` 8 (d)): a SwinUNETR student trained on
//! `(1 - lambda) DiceCE(student, labels) + lambda KD(student, teacher)`, the teacher frozen and
//! run without a graph on the same augmented crop (one crop in HU at the student's spacing, each
//! network normalising it its own way). `lambda = 0` (or no teacher) is plain supervised training,
//! the baseline distillation is measured against. Checkpoints, schedule, clipping and validation
//! are the teacher training's.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use prosam_models::format::{Architecture, Metadata, ModelFile};
use prosam_models::network::Network;
use prosam_models::swin_unetr::{Config, SwinUnetr};
use serde::{Deserialize, Serialize};

use crate::augment::{Centres, CropOptions, CropSampling, random_crop};
use crate::data::Case;
use crate::loss::{KdLoss, distillation_loss};
use crate::optim::{AdamW, AdamWConfig, learning_rate};
use crate::rng::Rng;
use crate::run::{
    CheckpointContents, Validation, check_ce_weight, read_checkpoint, validate_network, write_checkpoint,
};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillOptions {
    /// Weight of the teacher term; 0 trains on the labels alone.
    pub lambda: f64,
    pub kd: KdLoss,
    /// Crop size in voxels (multiples of 32, at least 64 along one axis; a teacher must take this
    /// crop, so with one it is its cubic crop). Also the student's sliding window.
    pub crop: [usize; 3],
    /// Where crops are centred (the reference: positive/negative).
    #[serde(default)]
    pub crop_sampling: CropSampling,
    /// Class weights of the cross-entropy (one per class), e.g.
    /// [`inverse_sqrt_frequency_weights`](crate::loss::inverse_sqrt_frequency_weights)
    /// of the training labels; none: every voxel counts the same (the reference).
    #[serde(default)]
    pub ce_weight: Option<Vec<f64>>,
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub lr: f64,
    pub clip: f64,
    pub samples_per_case: usize,
    pub val_every: usize,
    pub overlap: f64,
    pub seed: u64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            lambda: 0.5,
            kd: KdLoss::MseLogits,
            crop: [64; 3],
            crop_sampling: CropSampling::PosNeg,
            ce_weight: None,
            epochs: 100,
            warmup_epochs: 2,
            lr: 1e-3,
            clip: 1.0,
            samples_per_case: 1,
            val_every: 5,
            overlap: 0.25,
            seed: 42,
        }
    }
}

/// The frozen teacher: any prosam model file (the AutoProSAM teacher, or a bigger student).
pub struct Teacher {
    pub net: Network,
    pub metadata: Metadata,
}

impl Teacher {
    pub fn load(path: &Path, device: &Device) -> Result<Teacher> {
        let file = ModelFile::open(path)?;
        let net = file.network(DType::F32, device)?;
        Ok(Teacher { net, metadata: file.metadata().clone() })
    }

    /// Whether this teacher can teach a student of `metadata` on crops of `crop`^3.
    fn check(&self, metadata: &Metadata, crop: [usize; 3], path_hint: &str) -> Result<()> {
        let bad = |reason: String| Error::Options(format!("the teacher {path_hint}: {reason}"));
        if self.metadata.labels.len() != metadata.labels.len() {
            return Err(bad(format!(
                "has {} classes and the student {}: they must predict the same classes",
                self.metadata.labels.len(),
                metadata.labels.len()
            )));
        }
        if self.metadata.spacing.iter().zip(&metadata.spacing).any(|(a, b)| (a - b).abs() > 1e-6) {
            return Err(bad(format!(
                "works at {:?} mm and the student at {:?} mm: both see one crop, so the spacings must agree (train the teacher with --spacing)",
                self.metadata.spacing, metadata.spacing
            )));
        }
        self.net
            .check_input(&[1, 1, crop[0], crop[1], crop[2]])
            .map_err(|e| bad(format!("cannot take the {crop:?} crop: {e}")))
    }
}

/// PyTorch's initialisation of a MONAI SwinUNETR, seeded: linear weights and the relative-position
/// tables from a normal of std 0.02 truncated at 2 std (`trunc_normal_(std=.02)`, as MONAI's
/// `SwinTransformer` does), convolution weights uniform in `+-1/sqrt(fan_in)` (PyTorch's default),
/// LayerNorms at 1 and 0, biases at 0.
pub fn student_random_weights(cfg: &Config, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> =
                if name.ends_with("relative_position_bias_table") || (name.ends_with(".weight") && shape.len() == 2) {
                    (0..n)
                        .map(|_| {
                            loop {
                                let v = rng.normal();
                                if v.abs() <= 2.0 {
                                    break (0.02 * v) as f32;
                                }
                            }
                        })
                        .collect()
                } else if name.ends_with(".weight") && shape.len() == 5 {
                    let bound = 1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt();
                    (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
                } else if name.ends_with(".weight") {
                    vec![1.0; n]
                } else {
                    vec![0.0; n]
                };
            Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StudentCheckpoint {
    config: Config,
    options: DistillOptions,
    epoch: usize,
    rng: Rng,
    optimizer_steps: Vec<(String, u64)>,
    best_mean_dice_with_background: Option<f64>,
    /// The teacher file's checksum, so that a resumed run has the same teacher.
    teacher_checksum: Option<String>,
}

/// One distillation run.
pub struct StudentTrainer {
    pub cfg: Config,
    pub metadata: Metadata,
    pub options: DistillOptions,
    vars: Vec<(String, Var)>,
    model: SwinUnetr,
    teacher: Option<Teacher>,
    optimizer: AdamW,
    rng: Rng,
    pub epoch: usize,
    pub(crate) best: Option<f64>,
    device: Device,
}

impl StudentTrainer {
    /// A fresh run of the student `metadata` describes from `weights`, taught by `teacher` when
    /// `options.lambda > 0`.
    pub fn new(
        metadata: Metadata,
        weights: Vec<(String, Tensor)>,
        teacher: Option<Teacher>,
        options: DistillOptions,
        device: &Device,
    ) -> Result<Self> {
        let Architecture::SwinUnetr(cfg) = metadata.architecture.clone() else {
            return Err(Error::Options("the student must be a SwinUNETR".into()));
        };
        if !(0.0..=1.0).contains(&options.lambda) {
            return Err(Error::Options(format!("lambda {} is outside 0..1", options.lambda)));
        }
        if options.lambda > 0.0 && teacher.is_none() {
            return Err(Error::Options(format!("lambda {} needs a teacher", options.lambda)));
        }
        if options.epochs == 0 || options.samples_per_case == 0 || options.val_every == 0 {
            return Err(Error::Options("epochs, samples per case and the validation interval must be positive".into()));
        }
        let [a, b, c] = options.crop;
        cfg.check_input(&[1, cfg.in_channels, a, b, c])?;
        check_ce_weight(options.ce_weight.as_deref(), cfg.out_channels, "student")?;
        if let Some(t) = &teacher {
            t.check(&metadata, options.crop, &t.metadata.name)?;
        }
        let mut vars = Vec::new();
        for (name, shape) in cfg.parameter_shapes() {
            let t = weights
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| Error::Options(format!("the starting weights lack `{name}`")))?
                .1
                .to_dtype(DType::F32)?
                .to_device(device)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Options(format!("`{name}` is {:?}, the student needs {shape:?}", t.dims())));
            }
            vars.push((name, Var::from_tensor(&t)?));
        }
        let model = build(&cfg, vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())), device)?;
        let optimizer =
            AdamW::new(vec![("student".into(), vars.clone())], AdamWConfig { lr: options.lr, ..Default::default() })?;
        let rng = Rng::new(options.seed);
        Ok(Self {
            cfg,
            metadata,
            options,
            vars,
            model,
            teacher,
            optimizer,
            rng,
            epoch: 0,
            best: None,
            device: device.clone(),
        })
    }

    /// Sets the cross-entropy's class weights (checked as [`StudentTrainer::new`] checks them).
    pub fn set_ce_weight(&mut self, ce_weight: Option<Vec<f64>>) -> Result<()> {
        check_ce_weight(ce_weight.as_deref(), self.cfg.out_channels, "student")?;
        self.options.ce_weight = ce_weight;
        Ok(())
    }

    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
    }

    pub fn teacher(&self) -> Option<&Teacher> {
        self.teacher.as_ref()
    }

    /// The current weights, detached (views that later steps update in place).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }

    /// The loss of one crop: `student_image` and `teacher_image` are the crop normalised for each.
    pub fn loss(
        &self,
        student_image: &[f32],
        teacher_image: Option<&[f32]>,
        labels: &[u8],
        size: [usize; 3],
    ) -> Result<Tensor> {
        let shape = (1, 1, size[0], size[1], size[2]);
        let x = Tensor::from_slice(student_image, shape, &self.device)?;
        let y = Tensor::from_slice(labels, (1, size[0], size[1], size[2]), &self.device)?;
        let logits = self.model.forward(&x)?;
        let teacher_logits = match (&self.teacher, teacher_image) {
            (Some(t), Some(image)) if self.options.lambda > 0.0 => {
                Some(t.net.forward(&Tensor::from_slice(image, shape, &self.device)?)?.detach())
            }
            _ => None,
        };
        let ce_weight = self.options.ce_weight.as_deref().map(|w| Tensor::new(w, &self.device)).transpose()?;
        Ok(distillation_loss(
            &logits,
            &y,
            teacher_logits.as_ref(),
            self.options.lambda,
            self.options.kd,
            ce_weight.as_ref(),
        )?)
    }

    /// One epoch: the schedule's learning rate, then `samples_per_case` crops of every case in a
    /// shuffled order, one optimisation step each. Returns the mean loss and the learning rate.
    pub fn train_epoch(&mut self, cases: &[Case], progress: &mut dyn FnMut(usize, usize, f32)) -> Result<(f64, f64)> {
        let o = self.options.clone();
        let lr = learning_rate(o.lr, self.epoch, o.warmup_epochs, o.epochs);
        self.optimizer.set_lr(lr);
        let crop = CropOptions::reference(o.crop).with_sampling(o.crop_sampling);
        let centres: Vec<Centres> = cases.iter().map(|case| Centres::new(case, crop.sampling)).collect();
        let mut order: Vec<usize> = (0..cases.len()).flat_map(|i| std::iter::repeat_n(i, o.samples_per_case)).collect();
        self.rng.shuffle(&mut order);
        // The student's transform, then the teacher's: one crop, two normalised images.
        let mut intensities = vec![self.metadata.intensity];
        intensities.extend(self.teacher.as_ref().filter(|_| o.lambda > 0.0).map(|t| t.metadata.intensity));
        let mut total = 0.0;
        for (done, &i) in order.iter().enumerate() {
            let refs: Vec<_> = intensities.iter().collect();
            let sample = random_crop(&cases[i], &centres[i], &refs, &crop, &mut self.rng);
            let loss =
                self.loss(&sample.images[0], sample.images.get(1).map(Vec::as_slice), &sample.labels, sample.size)?;
            let grads = loss.backward()?;
            self.optimizer.step(&grads, Some(o.clip))?;
            let loss = loss.to_scalar::<f32>()?;
            total += loss as f64;
            progress(done + 1, order.len(), loss);
        }
        self.epoch += 1;
        Ok((total / order.len() as f64, lr))
    }

    /// Sliding-window validation of the student on `cases` (model grid, HU).
    pub fn validate(&self, cases: &[Case]) -> Result<Validation> {
        let net = build(&self.cfg, self.weights(), &self.device)?;
        validate_network(
            &|x| net.forward(x),
            &self.metadata,
            self.options.crop,
            self.options.overlap,
            cases,
            &self.device,
        )
    }

    /// Writes what a resumed run needs (weights, moments, steps, epoch, random state, and the
    /// teacher's checksum) in one file, atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let (moments, optimizer_steps) = self.optimizer.state();
        let state = StudentCheckpoint {
            config: self.cfg.clone(),
            options: self.options.clone(),
            epoch: self.epoch,
            rng: self.rng,
            optimizer_steps,
            best_mean_dice_with_background: self.best,
            teacher_checksum: self.teacher.as_ref().map(|t| t.metadata.checksum.clone()),
        };
        write_checkpoint(path, self.weights(), moments, &state, &self.metadata)
    }

    /// A run resumed from [`StudentTrainer::save_checkpoint`] with the same options (the number of
    /// epochs may grow) and the same teacher. The class weights come from the checkpoint (they are
    /// derived from the training labels after the trainer exists: compare them with
    /// [`DistillOptions::ce_weight`] of the result).
    pub fn resume(path: &Path, options: DistillOptions, teacher: Option<Teacher>, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let CheckpointContents { state, metadata, weights, moments } = read_checkpoint::<StudentCheckpoint>(path)?;
        let options = DistillOptions { ce_weight: state.options.ce_weight.clone(), ..options };
        let same = DistillOptions { epochs: state.options.epochs, ..options.clone() };
        if same != state.options {
            return Err(bad(format!(
                "the checkpoint was trained with other options ({:?}); this run asks for {:?}",
                state.options, options
            )));
        }
        let checksum = teacher.as_ref().map(|t| t.metadata.checksum.clone());
        if checksum != state.teacher_checksum {
            return Err(bad(format!(
                "the checkpoint was taught by {}, this run gives {}",
                state.teacher_checksum.as_deref().unwrap_or("no teacher"),
                checksum.as_deref().unwrap_or("no teacher")
            )));
        }
        let weights: Vec<(String, Tensor)> = weights.into_iter().collect();
        let mut trainer = Self::new(metadata, weights, teacher, options, device)?;
        trainer.optimizer.load_state(&moments, &state.optimizer_steps).map_err(|e| bad(e.to_string()))?;
        trainer.epoch = state.epoch;
        trainer.rng = state.rng;
        trainer.best = state.best_mean_dice_with_background;
        Ok(trainer)
    }
}

fn build(cfg: &Config, weights: impl IntoIterator<Item = (String, Tensor)>, device: &Device) -> Result<SwinUnetr> {
    let vb = VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, device);
    Ok(SwinUnetr::new(cfg, vb)?)
}
