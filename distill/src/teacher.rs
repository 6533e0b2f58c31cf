//! Training the AutoProSAM teacher: the two stages of `../shared/spec/teacher.md` section 8 (c),
//! AdamW per part (encoder, APG, decoder) with clipping, the reference schedule, checkpoints that
//! resume exactly, and validation by sliding window with per-class Dice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use prosam_models::autoprosam::{AutoProSam, Config};
use prosam_models::format::import::import_autoprosam;
use prosam_models::format::{Architecture, Metadata, ModelFile};
use serde::{Deserialize, Serialize};

use crate::augment::{Centres, CropOptions, CropSampling, random_crop};
use crate::data::{Case, Dataset};
use crate::loss::teacher_loss;
use crate::optim::{AdamW, AdamWConfig, learning_rate};
use crate::rng::Rng;
use crate::run::{
    CheckpointContents, Validation, check_ce_weight, read_checkpoint, validate_network, write_checkpoint,
};
use crate::{Error, Result};

/// The reference code's parameter groups, each with its own AdamW and clipping.
pub const GROUPS: [(&str, &str); 3] = [("encoder", "encoder."), ("apg", "feature."), ("decoder", "decoder.")];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// 1: adapters, depth embeddings, norms, necks, APG and decoder; 2: APG and decoder only.
    pub stage: u8,
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub lr: f64,
    /// Gradient norm per group (the reference clips at 1.0).
    pub clip: f64,
    /// Crops drawn from each training case per epoch (the reference: 1).
    pub samples_per_case: usize,
    /// Where crops are centred (the reference: positive/negative).
    #[serde(default)]
    pub crop_sampling: CropSampling,
    /// Class weights of the cross-entropy (MONAI's `ce_weight`; the reference: none). Set them with
    /// [`TeacherTrainer::set_ce_weight`], which checks them against the class count.
    #[serde(default)]
    pub ce_weight: Option<Vec<f64>>,
    /// Validate every this many epochs (and after the last).
    pub val_every: usize,
    /// Sliding-window overlap of validation (the reference: 0.25, constant blend).
    pub overlap: f64,
    pub seed: u64,
    /// Stage 1 back-propagates through every encoder block; with this, the blocks run without a
    /// graph and each is recomputed with one during the backward pass (activation checkpointing):
    /// one block's graph alive at a time instead of all of them, for about a third more compute.
    #[serde(default)]
    pub checkpoint_blocks: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            stage: 1,
            epochs: 400,
            warmup_epochs: 5,
            lr: 5e-4,
            clip: 1.0,
            samples_per_case: 1,
            crop_sampling: CropSampling::PosNeg,
            ce_weight: None,
            val_every: 1,
            overlap: 0.25,
            seed: 42,
            checkpoint_blocks: true,
        }
    }
}

/// Where the starting weights come from.
#[derive(Debug, Clone)]
pub enum Init {
    /// PyTorch's default initialisation, seeded.
    Random(u64),
    /// A prosam teacher model file, or a reference checkpoint (`encoder.`/`feature.`/`decoder.`).
    File(PathBuf),
    /// SAM's image encoder (an official `.pth` checkpoint or safetensors with its names) over
    /// PyTorch's random initialisation of the rest, seeded.
    Sam(PathBuf, u64),
}

/// PyTorch's default initialisation of every parameter: linear and convolution weights and biases
/// uniform in `+-1/sqrt(fan_in)` (`kaiming_uniform_(a=sqrt(5))`), LayerNorms at 1 and 0, SAM's
/// position embedding and relative-position tables at 0, the depth embedding at 1 and the
/// rel-pos scale `lr` at 1 (`ImageEncoderViT_3d_v2`'s own initial values).
pub fn random_weights(cfg: &Config, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed);
    let mut fans: HashMap<String, usize> = HashMap::new();
    let shapes = cfg.parameter_shapes();
    for (name, shape) in &shapes {
        if name.ends_with(".weight") && shape.len() >= 2 {
            let fan_in = if name.ends_with("adapter.conv.weight") || name.ends_with("slice_embed.weight") {
                shape[2..].iter().product()
            } else {
                shape[1..].iter().product()
            };
            fans.insert(name.trim_end_matches(".weight").to_string(), fan_in);
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let stem = name.trim_end_matches(".weight").trim_end_matches(".bias");
            let values: Vec<f32> = if name.ends_with("pos_embed") || name.contains("rel_pos_") {
                vec![0.0; n]
            } else if name.ends_with("depth_embed") || name.ends_with("attn.lr") {
                vec![1.0; n]
            } else if let Some(&fan_in) = fans.get(stem) {
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
            } else if name.ends_with(".weight") {
                vec![1.0; n] // a norm's scale
            } else {
                vec![0.0; n] // a norm's shift
            };
            Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
        })
        .collect()
}

/// The weights of `init` for `cfg`, checked.
pub fn initial_weights(cfg: &Config, init: &Init) -> Result<Vec<(String, Tensor)>> {
    match init {
        Init::Random(seed) => random_weights(cfg, *seed),
        Init::Sam(path, seed) => {
            let sam = prosam_models::format::import::sam::read_sam_encoder(path)?;
            Ok(prosam_models::format::import::sam::load_sam_into(cfg, random_weights(cfg, *seed)?, &sam, path)?)
        }
        Init::File(path) => {
            // A safetensors file: an 8-byte header length, then the JSON header.
            let mut head = [0u8; 9];
            {
                use std::io::Read;
                let mut f = std::fs::File::open(path).map_err(|source| Error::Io { path: path.clone(), source })?;
                f.read_exact(&mut head).map_err(|source| Error::Io { path: path.clone(), source })?;
            }
            let is_model_file = head[8] == b'{';
            if !is_model_file {
                return Ok(import_autoprosam(path, cfg)?.tensors);
            }
            let file = ModelFile::open(path)?;
            let Architecture::AutoProSam(file_cfg) = &file.metadata().architecture else {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    reason: "a student model file, not a teacher".into(),
                });
            };
            if file_cfg != cfg {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    reason: format!("a teacher of another configuration ({file_cfg:?}; this run: {cfg:?})"),
                });
            }
            let tensors = file.tensors(&Device::Cpu)?;
            cfg.parameter_shapes()
                .into_iter()
                .map(|(name, _)| {
                    let t = tensors
                        .get(&name)
                        .ok_or_else(|| Error::Checkpoint { path: path.clone(), reason: format!("no `{name}`") })?;
                    Ok((name, t.to_dtype(DType::F32)?))
                })
                .collect()
        }
    }
}

/// What the checkpoint's header records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    config: Config,
    options: TrainOptions,
    /// The last finished epoch.
    epoch: usize,
    rng: Rng,
    optimizer_steps: Vec<(String, u64)>,
    best_mean_dice_with_background: Option<f64>,
}

/// One training run of the teacher.
pub struct TeacherTrainer {
    pub cfg: Config,
    pub metadata: Metadata,
    pub options: TrainOptions,
    /// Every parameter: trainable ones are variables, frozen ones plain tensors.
    weights: Vec<(String, Tensor)>,
    vars: HashMap<String, Var>,
    model: AutoProSam,
    /// The same network on detached views of the same weights (updated in place by the
    /// optimizer): the blocks' forward pass without a graph, for checkpointing.
    shadow: AutoProSam,
    optimizer: AdamW,
    rng: Rng,
    /// Epochs finished.
    pub epoch: usize,
    pub(crate) best: Option<f64>,
    device: Device,
}

impl TeacherTrainer {
    /// A fresh run from `weights`; `metadata` is the model file's description (its spacing and
    /// intensity transform define the data's preprocessing).
    pub fn new(
        metadata: Metadata,
        weights: Vec<(String, Tensor)>,
        options: TrainOptions,
        device: &Device,
    ) -> Result<Self> {
        let Architecture::AutoProSam(cfg) = metadata.architecture.clone() else {
            return Err(Error::Options("the metadata does not describe a teacher".into()));
        };
        cfg.validate()?;
        if !matches!(options.stage, 1 | 2) {
            return Err(Error::Options(format!("stage {} (the teacher trains in stage 1 or 2)", options.stage)));
        }
        if options.epochs == 0 || options.samples_per_case == 0 || options.val_every == 0 {
            return Err(Error::Options("epochs, samples per case and the validation interval must be positive".into()));
        }
        check_ce_weight(options.ce_weight.as_deref(), cfg.n_out, "teacher")?;
        let mut vars = HashMap::new();
        let mut held = Vec::with_capacity(weights.len());
        for (name, t) in weights {
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            if Config::trains_in_stage(&name, options.stage) {
                let var = Var::from_tensor(&t)?;
                held.push((name.clone(), var.as_tensor().clone()));
                vars.insert(name, var);
            } else {
                held.push((name, t));
            }
        }
        let model = build(&cfg, &held, device)?;
        let detached: Vec<(String, Tensor)> = held.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        let shadow = build(&cfg, &detached, device)?;
        let groups = GROUPS
            .iter()
            .map(|(group, prefix)| {
                let mut params: Vec<(String, Var)> =
                    vars.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, v)| (n.clone(), v.clone())).collect();
                params.sort_by(|a, b| a.0.cmp(&b.0));
                (group.to_string(), params)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let optimizer = AdamW::new(groups, AdamWConfig { lr: options.lr, ..Default::default() })?;
        let rng = Rng::new(options.seed);
        Ok(Self {
            cfg,
            metadata,
            options,
            weights: held,
            vars,
            model,
            shadow,
            optimizer,
            rng,
            epoch: 0,
            best: None,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &AutoProSam {
        &self.model
    }

    /// The optimizer's parameter groups: each trainable parameter's name and variable.
    pub fn optimizer_groups(&self) -> Vec<Vec<(String, Var)>> {
        self.optimizer.groups().iter().map(|g| g.params.clone()).collect()
    }

    /// Parameters this stage trains, and all of them.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let count = |t: &Tensor| t.elem_count();
        (self.vars.values().map(|v| count(v.as_tensor())).sum(), self.weights.iter().map(|(_, t)| count(t)).sum())
    }

    /// The current weights, detached: views of the training's storage, which later steps update
    /// in place (copy them to keep a snapshot).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.weights.iter().map(|(n, t)| (n.clone(), t.detach())).collect()
    }

    /// One optimisation step on one crop; returns the loss.
    pub fn step(&mut self, image: &[f32], labels: &[u8], size: [usize; 3]) -> Result<f32> {
        let checkpointed = self.options.stage == 1 && self.options.checkpoint_blocks;
        let (loss, grads) = self.gradients(image, labels, size, checkpointed)?;
        self.optimizer.step(&grads, Some(self.options.clip))?;
        Ok(loss)
    }

    /// The loss of one crop and the gradients of the trainable parameters, by one backward pass
    /// through the whole graph or, `checkpointed`, block by block (see
    /// [`TrainOptions::checkpoint_blocks`]); both give the same gradients up to rounding.
    pub fn gradients(
        &self,
        image: &[f32],
        labels: &[u8],
        size: [usize; 3],
        checkpointed: bool,
    ) -> Result<(f32, GradStore)> {
        let x = Tensor::from_slice(image, (1, 1, size[0], size[1], size[2]), &self.device)?;
        let y = Tensor::from_slice(labels, (1, size[0], size[1], size[2]), &self.device)?;
        let ce_weight = self.options.ce_weight.as_deref().map(|w| Tensor::new(w, &self.device)).transpose()?;
        let mut grads = GradStore::default();
        if !checkpointed {
            let loss = teacher_loss(&self.model.forward(&x)?, &y, ce_weight.as_ref())?;
            self.keep_trainable(loss.backward()?, &mut grads)?;
            return Ok((loss.to_scalar::<f32>()?, grads));
        }
        let encoder = self.model.encoder();
        let depth = self.cfg.depth;
        // The tokens keep their graph (the slice and depth embeddings train); the blocks run
        // without one, keeping each block's input.
        let tokens = encoder.tokens(&x)?;
        let mut saved = vec![tokens.detach()];
        for block in self.shadow.encoder().blocks() {
            let next = block.forward(saved.last().expect("the tokens"))?;
            saved.push(next);
        }
        // Necks, APG and decoder with their graph, on the saved block outputs as leaves.
        let leaves: Vec<Var> =
            self.cfg.taps.iter().map(|&b| Var::from_tensor(&saved[b])).collect::<candle_core::Result<_>>()?;
        let taps = leaves
            .iter()
            .zip(encoder.necks())
            .map(|(leaf, neck)| neck.forward(leaf.as_tensor()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let features = self.model.decoder_inputs(&taps, self.cfg.apg_input)?;
        let loss = teacher_loss(&self.model.decoder().forward(&features, &x)?, &y, ce_weight.as_ref())?;
        let mut decoder_grads = loss.backward()?;
        // The gradient reaching each block's output: from its tap, and from the next block.
        let mut upstream: Vec<Option<Tensor>> = vec![None; depth + 1];
        let accumulate = |slot: &mut Option<Tensor>, g: Tensor| -> candle_core::Result<()> {
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
            Ok(())
        };
        for (&b, leaf) in self.cfg.taps.iter().zip(&leaves) {
            if let Some(g) = decoder_grads.remove(leaf.as_tensor()) {
                accumulate(&mut upstream[b], g.copy()?)?;
            }
        }
        self.keep_trainable(decoder_grads, &mut grads)?;
        for i in (0..depth).rev() {
            let Some(g) = upstream[i + 1].take() else { continue };
            let input = Var::from_tensor(&saved[i])?;
            let out = encoder.blocks()[i].forward(input.as_tensor())?;
            let mut block_grads = (out * g)?.sum_all()?.backward()?;
            if let Some(g_in) = block_grads.remove(input.as_tensor()) {
                accumulate(&mut upstream[i], g_in.copy()?)?;
            }
            self.keep_trainable(block_grads, &mut grads)?;
        }
        if let Some(g) = upstream[0].take() {
            self.keep_trainable((tokens * g)?.sum_all()?.backward()?, &mut grads)?;
        }
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    /// Moves the trainable parameters' gradients of `from` into `into` (adding to what is there),
    /// each copied into its own storage; the rest is dropped. A backward pass also leaves
    /// gradients for frozen weights and constants, and some gradients are views that keep a far
    /// larger buffer alive: ViT-B's stage-1 step at 32^3 held 5.7 GiB without this, 1.4 GiB with it.
    fn keep_trainable(&self, mut from: GradStore, into: &mut GradStore) -> Result<()> {
        for var in self.vars.values() {
            if let Some(g) = from.remove(var.as_tensor()) {
                let g = g.copy()?;
                let sum = match into.remove(var.as_tensor()) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                into.insert(var.as_tensor(), sum);
            }
        }
        Ok(())
    }

    /// One epoch: the learning rate of the schedule, then `samples_per_case` crops of every case
    /// in a shuffled order. Returns the mean loss.
    pub fn train_epoch(&mut self, cases: &[Case], progress: &mut dyn FnMut(usize, usize, f32)) -> Result<(f64, f64)> {
        let o = self.options.clone();
        let lr = learning_rate(o.lr, self.epoch, o.warmup_epochs, o.epochs);
        self.optimizer.set_lr(lr);
        let crop = CropOptions::reference([self.cfg.crop; 3]).with_sampling(o.crop_sampling);
        let centres: Vec<Centres> = cases.iter().map(|case| Centres::new(case, crop.sampling)).collect();
        let mut order: Vec<usize> = (0..cases.len()).flat_map(|i| std::iter::repeat_n(i, o.samples_per_case)).collect();
        self.rng.shuffle(&mut order);
        let mut total = 0.0;
        for (done, &i) in order.iter().enumerate() {
            let sample = random_crop(&cases[i], &centres[i], &[&self.metadata.intensity], &crop, &mut self.rng);
            let loss = self.step(&sample.images[0], &sample.labels, sample.size)?;
            total += loss as f64;
            progress(done + 1, order.len(), loss);
        }
        self.epoch += 1;
        Ok((total / order.len() as f64, lr))
    }

    /// Sliding-window validation of `cases` (each on the model grid, in HU).
    pub fn validate(&self, cases: &[Case]) -> Result<Validation> {
        let net = build(&self.cfg, &self.weights(), &self.device)?;
        validate_network(
            &|x| net.forward(x),
            &self.metadata,
            [self.cfg.crop; 3],
            self.options.overlap,
            cases,
            &self.device,
        )
    }

    /// Writes everything a resumed run needs: weights, optimizer moments and steps, the epoch and
    /// the random state, in one safetensors file written atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let (moments, optimizer_steps) = self.optimizer.state();
        let state = CheckpointState {
            config: self.cfg.clone(),
            options: self.options.clone(),
            epoch: self.epoch,
            rng: self.rng,
            optimizer_steps,
            best_mean_dice_with_background: self.best,
        };
        write_checkpoint(path, self.weights(), moments, &state, &self.metadata)
    }

    /// Sets the cross-entropy's class weights (one per class, finite, non-negative, one positive).
    pub fn set_ce_weight(&mut self, ce_weight: Option<Vec<f64>>) -> Result<()> {
        check_ce_weight(ce_weight.as_deref(), self.cfg.n_out, "teacher")?;
        self.options.ce_weight = ce_weight;
        Ok(())
    }

    /// A run resumed from [`TeacherTrainer::save_checkpoint`]: `options` must match the saved run's
    /// except for the number of epochs, which may grow, and the class weights, which come from the
    /// checkpoint (they are derived from the training labels after the trainer exists: compare
    /// them with [`TrainOptions::ce_weight`] of the result).
    pub fn resume(path: &Path, options: TrainOptions, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let CheckpointContents { state, metadata, weights: tensors, moments } =
            read_checkpoint::<CheckpointState>(path)?;
        let options = TrainOptions { ce_weight: state.options.ce_weight.clone(), ..options };
        let same = TrainOptions { epochs: state.options.epochs, ..options.clone() };
        if same != state.options {
            return Err(bad(format!(
                "the checkpoint was trained with other options ({:?}); this run asks for {:?}",
                state.options, options
            )));
        }
        let weights = state
            .config
            .parameter_shapes()
            .into_iter()
            .map(|(name, _)| {
                let t = tensors.get(&name).ok_or_else(|| bad(format!("no weight `{name}`")))?;
                Ok((name, t.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut trainer = Self::new(metadata, weights, options, device)?;
        trainer.optimizer.load_state(&moments, &state.optimizer_steps).map_err(|e| bad(e.to_string()))?;
        trainer.epoch = state.epoch;
        trainer.rng = state.rng;
        trainer.best = state.best_mean_dice_with_background;
        Ok(trainer)
    }
}

fn build(cfg: &Config, weights: &[(String, Tensor)], device: &Device) -> Result<AutoProSam> {
    let vb = VarBuilder::from_tensors(weights.iter().cloned().collect(), DType::F32, device);
    Ok(AutoProSam::new(cfg, vb)?)
}

/// Loads the cases of `entries` for `metadata`'s grid.
pub fn load_cases(
    dataset: &Dataset,
    validation: bool,
    metadata: &Metadata,
    label_map: Option<&crate::data::LabelMap>,
    cache: Option<&Path>,
) -> Result<Vec<Case>> {
    let entries = if validation { &dataset.validation } else { &dataset.training };
    entries.iter().map(|e| crate::data::load_case(e, metadata, label_map, cache)).collect()
}
