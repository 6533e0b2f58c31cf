//! The epoch loop both trainings share: train, validate every few epochs (keeping the best
//! model), checkpoint after every epoch, log one JSON line per epoch, stop on time.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use prosam_models::format::Metadata;

use crate::data::Case;
use crate::teacher::Validation;
use crate::{Error, Result};

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
