//! What the teacher's and the students' trainings share: the epoch loop (train, validate every
//! few epochs keeping the best model, checkpoint after every epoch, log one JSON line per epoch,
//! stop on time), sliding-window validation with MONAI's metrics, and the checkpoint file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use prosam_models::format::Metadata;
use prosam_runtime::engine::{SegmentOptions, WindowInference};
use prosam_runtime::pipeline::{Blend, intensity};
use serde::{Deserialize, Serialize};

use crate::data::Case;
use crate::{Error, Result};

/// Checks class weights for the cross-entropy of a `network` ("teacher", "student") with
/// `classes` outputs: one each, finite, non-negative, at least one positive.
pub(crate) fn check_ce_weight(ce_weight: Option<&[f64]>, classes: usize, network: &str) -> Result<()> {
    match ce_weight {
        Some(w)
            if w.len() != classes || w.iter().any(|v| !v.is_finite() || *v < 0.0) || w.iter().all(|v| *v == 0.0) =>
        {
            Err(Error::Options(format!(
                "class weights {w:?}: the {network} has {classes} classes; one weight each, finite, non-negative, one positive"
            )))
        }
        _ => Ok(()),
    }
}

/// What the loop needs of a training run (the teacher's and the students').
pub trait Training {
    /// Epochs finished, and the run's total.
    fn epoch(&self) -> usize;
    fn epochs(&self) -> usize;
    fn val_every(&self) -> usize;
    fn steps_per_epoch(&self, cases: usize) -> usize;
    fn train_epoch(&mut self, cases: &[Case], progress: &mut dyn FnMut(usize, usize, f32)) -> Result<(f64, f64)>;
    fn validate(&self, cases: &[Case]) -> Result<Validation>;
    fn save_checkpoint(&self, path: &Path) -> Result<()>;
    /// The model file's description and the current weights.
    fn metadata(&self) -> &Metadata;
    fn weights(&self) -> Vec<(String, Tensor)>;
    /// The best mean Dice with background so far (what the reference selects by).
    fn best(&mut self) -> &mut Option<f64>;

    /// Records a validation; true when it is the best so far.
    fn record_best(&mut self, v: &Validation) -> bool {
        let best = self.best();
        let better = best.is_none_or(|b| v.mean_dice_with_background > b);
        if better {
            *best = Some(v.mean_dice_with_background);
        }
        better
    }

    /// The trained network as a prosam model file the runtime loads.
    fn export(&self, path: &Path) -> Result<()> {
        prosam_models::format::save(path, self.metadata().clone(), &self.weights())?;
        Ok(())
    }
}

/// Where a run keeps its files, and when it stops.
pub struct RunFiles<'a> {
    pub out: &'a Path,
    /// The final model's file name in `out` (`teacher.safetensors`, `student.safetensors`).
    pub model_name: &'a str,
    pub max_minutes: Option<f64>,
    pub quiet: bool,
}

/// Runs the remaining epochs: `out/last.safetensors` after each, `out/best.safetensors` at each
/// best validation, `out/log.jsonl` a line per epoch, and the final model when the run ends
/// (also after `max_minutes`, where `--resume` goes on). Returns the last validation.
pub fn run_epochs(
    trainer: &mut dyn Training,
    training: &[Case],
    validation: &[Case],
    files: &RunFiles,
) -> Result<Option<Validation>> {
    let out = files.out;
    if trainer.epoch() >= trainer.epochs() {
        return Err(Error::Options(format!(
            "the run in {} has finished its {} epochs (raise --epochs to go on)",
            out.display(),
            trainer.epochs()
        )));
    }
    let log_path = out.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| Error::Io { path: log_path.clone(), source })?;
    let steps = trainer.steps_per_epoch(training.len());
    let bar = if files.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new((trainer.epochs() * steps) as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta} {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_position((trainer.epoch() * steps) as u64);
        bar
    };
    let start = Instant::now();
    let minutes = || start.elapsed().as_secs_f64() / 60.0;
    let last = out.join("last.safetensors");
    let mut latest = None;
    while trainer.epoch() < trainer.epochs() {
        let t0 = Instant::now();
        let epoch = trainer.epoch();
        let (loss, lr) = trainer.train_epoch(training, &mut |_, _, l| {
            bar.inc(1);
            bar.set_message(format!("epoch {epoch} loss {l:.4}"));
        })?;
        let last_epoch = trainer.epoch() == trainer.epochs();
        let out_of_time = files.max_minutes.is_some_and(|m| minutes() >= m);
        let validate = !validation.is_empty()
            && (trainer.epoch().is_multiple_of(trainer.val_every()) || last_epoch || out_of_time);
        let mut record = serde_json::json!({
            "epoch": epoch, "loss": loss, "lr": lr, "steps": steps,
            "train_seconds": t0.elapsed().as_secs_f64(),
        });
        if validate {
            let tv = Instant::now();
            let v = trainer.validate(validation)?;
            if trainer.record_best(&v) {
                trainer.export(&out.join("best.safetensors"))?;
            }
            if !files.quiet {
                bar.suspend(|| {
                    eprintln!(
                        "epoch {epoch}: loss {loss:.4}, mean Dice {:.4}, mean NSD {:.4} {:.3?}",
                        v.mean_dice, v.mean_nsd, v.dice
                    )
                });
            }
            record["dice"] = serde_json::to_value(&v.dice).expect("JSON");
            record["nsd"] = serde_json::to_value(&v.nsd).expect("JSON");
            record["mean_dice"] = v.mean_dice.into();
            record["mean_nsd"] = v.mean_nsd.into();
            record["mean_dice_with_background"] = v.mean_dice_with_background.into();
            record["validation_seconds"] = tv.elapsed().as_secs_f64().into();
            latest = Some(v);
        }
        trainer.save_checkpoint(&last)?;
        writeln!(log, "{record}").map_err(|source| Error::Io { path: log_path.clone(), source })?;
        if out_of_time && !last_epoch {
            if !files.quiet {
                bar.suspend(|| eprintln!("stopping after {:.1} min (--max-minutes); --resume goes on", minutes()));
            }
            break;
        }
    }
    bar.finish_and_clear();
    let model = out.join(files.model_name);
    trainer.export(&model)?;
    if !files.quiet {
        eprintln!("{} epochs in {:.1} min; {}", trainer.epoch(), minutes(), model.display());
    }
    Ok(latest)
}

macro_rules! training_impl {
    ($t:ty) => {
        impl Training for $t {
            fn epoch(&self) -> usize {
                self.epoch
            }
            fn epochs(&self) -> usize {
                self.options.epochs
            }
            fn val_every(&self) -> usize {
                self.options.val_every
            }
            fn steps_per_epoch(&self, cases: usize) -> usize {
                cases * self.options.samples_per_case
            }
            fn train_epoch(
                &mut self,
                cases: &[Case],
                progress: &mut dyn FnMut(usize, usize, f32),
            ) -> Result<(f64, f64)> {
                <$t>::train_epoch(self, cases, progress)
            }
            fn validate(&self, cases: &[Case]) -> Result<Validation> {
                <$t>::validate(self, cases)
            }
            fn metadata(&self) -> &Metadata {
                &self.metadata
            }
            fn weights(&self) -> Vec<(String, Tensor)> {
                <$t>::weights(self)
            }
            fn best(&mut self) -> &mut Option<f64> {
                &mut self.best
            }
            fn save_checkpoint(&self, path: &Path) -> Result<()> {
                <$t>::save_checkpoint(self, path)
            }
        }
    };
}

training_impl!(crate::teacher::TeacherTrainer);
training_impl!(crate::student::StudentTrainer);

/// One validation: per-class Dice and normalized surface Dice as MONAI computes them
/// ([`prosam_runtime::metrics`]), each case on its own and then averaged over the cases where the
/// value exists (MONAI's `nanmean` over the batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Class name to mean Dice, for classes in some case's truth.
    pub dice: std::collections::BTreeMap<String, f64>,
    /// Class name to mean NSD at [`NSD_TOLERANCE_MM`], for classes in some case's truth or prediction.
    #[serde(default)]
    pub nsd: std::collections::BTreeMap<String, f64>,
    /// Mean over the foreground classes present.
    pub mean_dice: f64,
    #[serde(default)]
    pub mean_nsd: f64,
    /// Mean including background: what the reference selects the best checkpoint by.
    pub mean_dice_with_background: f64,
}

/// The surface tolerance of validation's NSD, in mm.
pub const NSD_TOLERANCE_MM: f64 = 2.0;

impl Validation {
    /// The figures of `cases`, each `(prediction, truth, dims)` in C order (the last axis fastest,
    /// as [`Case`] stores them) on a grid of `spacing` mm per axis.
    pub fn of_cases(cases: &[(Vec<u8>, Vec<u8>, [usize; 3])], spacing: [f64; 3], names: &[String]) -> Validation {
        use prosam_runtime::metrics::{evaluate, mean_finite};
        let k = names.len();
        let (mut dice, mut nsd, mut background) = (vec![Vec::new(); k], vec![Vec::new(); k], Vec::new());
        // The metrics take the first axis fastest: the same buffer, its axes named in reverse.
        let reversed_spacing = [spacing[2], spacing[1], spacing[0]];
        for (pred, truth, dims) in cases {
            let reversed_dims = [dims[2], dims[1], dims[0]];
            for m in evaluate(pred, truth, reversed_dims, reversed_spacing, k as u8, NSD_TOLERANCE_MM) {
                dice[m.label as usize].push(m.dice);
                nsd[m.label as usize].push(m.nsd);
            }
            let both = pred.iter().zip(truth).filter(|(p, t)| **p == 0 && **t == 0).count();
            let (p0, t0) = (pred.iter().filter(|&&p| p == 0).count(), truth.iter().filter(|&&t| t == 0).count());
            if t0 > 0 {
                background.push(2.0 * both as f64 / (p0 + t0) as f64);
            }
        }
        let per_class = |values: &[Vec<f64>]| -> std::collections::BTreeMap<String, f64> {
            (1..k)
                .filter_map(|c| {
                    let m = mean_finite(values[c].iter().copied());
                    m.is_finite().then(|| (names[c].clone(), m))
                })
                .collect()
        };
        let (dice, nsd) = (per_class(&dice), per_class(&nsd));
        let mean_dice = mean_finite(dice.values().copied());
        let background = mean_finite(background);
        let with_background = mean_finite(dice.values().copied().chain([background]));
        Validation {
            mean_nsd: mean_finite(nsd.values().copied()),
            mean_dice,
            mean_dice_with_background: with_background,
            dice,
            nsd,
        }
    }
}

/// Sliding-window validation of `net` on `cases` (each on the model grid of `metadata`, in HU):
/// the metadata's intensity transform, windows of `roi` at `overlap` with constant blending as
/// the reference validates, argmax, then [`Validation::of_cases`].
pub fn validate_network(
    net: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    metadata: &Metadata,
    roi: [usize; 3],
    overlap: f64,
    cases: &[Case],
    device: &Device,
) -> Result<Validation> {
    let classes = metadata.labels.len();
    let window =
        WindowInference { roi, classes, options: SegmentOptions { overlap, blend: Blend::Constant, batch: 1 } };
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        let mut data = case.image.clone();
        intensity::apply(&metadata.intensity, &mut data);
        let forward = |x: &Tensor| -> prosam_runtime::Result<Tensor> { Ok(net(x)?) };
        let probs = window.probabilities(&forward, &data, case.dims, device, DType::F32, &mut |_, _| true)?;
        let voxels = data.len();
        let pred = (0..voxels)
            .map(|v| {
                (0..classes)
                    .max_by(|&a, &b| probs[a * voxels + v].total_cmp(&probs[b * voxels + v]).then(b.cmp(&a)))
                    .unwrap_or(0) as u8
            })
            .collect();
        results.push((pred, case.labels.clone(), case.dims));
    }
    Ok(Validation::of_cases(&results, metadata.spacing, &metadata.labels))
}

/// Writes a training checkpoint atomically: the weights (`model.*`), the optimizer moments
/// (`optim.*`), the run's `state` and the model metadata in the header.
pub(crate) fn write_checkpoint(
    path: &Path,
    weights: Vec<(String, Tensor)>,
    moments: Vec<(String, Tensor)>,
    state: &impl Serialize,
    metadata: &Metadata,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = weights.into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
    tensors.extend(moments.into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
    let header = HashMap::from([
        ("prosam_checkpoint".to_string(), serde_json::to_string(state).expect("state serialises")),
        ("metadata".to_string(), serde_json::to_string(metadata).expect("metadata serialises")),
    ]);
    let views: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let bytes = safetensors::serialize(views, Some(header))
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    prosam_models::format::write_atomically(path, |f| f.write_all(&bytes))?;
    Ok(())
}

/// What [`write_checkpoint`] wrote: the state, the metadata, the weights by name (without
/// `model.`) and the moments by name (without `optim.`).
pub(crate) struct CheckpointContents<S> {
    pub state: S,
    pub metadata: Metadata,
    pub weights: HashMap<String, Tensor>,
    pub moments: HashMap<String, Tensor>,
}

pub(crate) fn read_checkpoint<S: serde::de::DeserializeOwned>(path: &Path) -> Result<CheckpointContents<S>> {
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let state: S = meta.get("prosam_checkpoint").and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| {
        bad("not a prosam-distill checkpoint of this kind of run (no matching `prosam_checkpoint` header)".into())
    })?;
    let metadata: Metadata = meta
        .get("metadata")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("the checkpoint has no model metadata".into()))?;
    let (mut weights, mut moments) = (HashMap::new(), HashMap::new());
    for (k, t) in candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)? {
        if let Some(n) = k.strip_prefix("model.") {
            weights.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix("optim.") {
            moments.insert(n.to_string(), t);
        }
    }
    Ok(CheckpointContents { state, metadata, weights, moments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_averages_monai_metrics_over_cases() {
        // C order [6, 6, 8]: a 4 x 4 x 5 block, predicted one voxel off along the last (fastest)
        // axis, whose voxels are 4 mm long: surface voxels off by a voxel are then beyond NSD's
        // 2 mm. Dice 128/160; of each block's 68 surface voxels, the 16 of the face beyond the
        // other block lie 4 mm from the other surface and the rest within 1 mm: NSD 104/136.
        // A second case is predicted exactly.
        let dims = [6, 6, 8];
        let block = |shift: usize| -> Vec<u8> {
            let mut v = vec![0u8; 288];
            for a in 1..5 {
                for b in 1..5 {
                    for c in 1 + shift..6 + shift {
                        v[(a * 6 + b) * 8 + c] = 1;
                    }
                }
            }
            v
        };
        let (truth, shifted) = (block(0), block(1));
        let names: Vec<String> = ["background", "organ", "absent"].iter().map(|s| s.to_string()).collect();
        let spacing = [1.0, 1.0, 4.0];
        let v = Validation::of_cases(
            &[(shifted.clone(), truth.clone(), dims), (truth.clone(), truth.clone(), dims)],
            spacing,
            &names,
        );
        let direct = prosam_runtime::metrics::evaluate(&shifted, &truth, [8, 6, 6], [4.0, 1.0, 1.0], 2, 2.0)[0];
        assert!((direct.dice - 0.8).abs() < 1e-12);
        assert!((direct.nsd - 104.0 / 136.0).abs() < 1e-12, "{direct:?}");
        assert!((v.dice["organ"] - (direct.dice + 1.0) / 2.0).abs() < 1e-12, "{v:?}");
        assert!((v.nsd["organ"] - (direct.nsd + 1.0) / 2.0).abs() < 1e-12, "{v:?}");
        assert!(!v.dice.contains_key("absent") && !v.nsd.contains_key("absent"));
    }
}
