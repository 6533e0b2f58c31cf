//! `prosam-distill`: training prosam's networks. `train-teacher` trains the AutoProSAM teacher on
//! a dataset in the Medical Segmentation Decathlon layout.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use prosam_distill::data::{Dataset, LabelMap};
use prosam_distill::teacher::{Init, TeacherTrainer, TrainOptions, initial_weights, load_cases, minutes_since};
use prosam_models::autoprosam::{ApgInput, Config};
use prosam_models::format::Metadata;

#[derive(Parser)]
#[command(
    name = "prosam-distill",
    version,
    about = "Train the AutoProSAM teacher and distill it into SwinUNETR students"
)]
struct Cli {
    /// Compute threads (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the teacher (stage 1: adapters, embeddings, norms, necks, APG, decoder; stage 2: APG and decoder).
    TrainTeacher(TrainTeacher),
}

#[derive(clap::Args)]
struct TrainTeacher {
    /// dataset.json: `training` (and `validation`) lists of {image, label} NIfTI paths, relative to the file.
    #[arg(long, value_name = "dataset.json")]
    data: PathBuf,
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "vit_b"])]
    preset: String,
    /// Crop edge in voxels (default: the preset's).
    #[arg(long)]
    crop: Option<usize>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    stage: u8,
    /// Output folder: checkpoints (last.safetensors), log.jsonl, best.safetensors and teacher.safetensors.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Starting weights: a prosam teacher file or a reference checkpoint (default: PyTorch's random init).
    #[arg(long, value_name = "FILE", conflicts_with = "sam")]
    init: Option<PathBuf>,
    /// SAM's image encoder to start from (the official .pth, e.g. sam_vit_b_01ec64.pth, or
    /// safetensors with its `image_encoder.*` names); the new parts start from PyTorch's init.
    #[arg(long, value_name = "FILE")]
    sam: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 400)]
    epochs: usize,
    #[arg(long, default_value_t = 5)]
    warmup_epochs: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Crops per training case per epoch.
    #[arg(long, default_value_t = 1)]
    samples_per_case: usize,
    /// Validate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    val_every: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Renumber labels with a JSON object {source: target}; other values become background.
    #[arg(long, value_name = "FILE")]
    label_map: Option<PathBuf>,
    /// Cache preprocessed volumes here (default: DIR/cache).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Voxel spacing of the model grid in mm (default: the students', 1.5,1.5,2.0).
    #[arg(long, value_name = "X,Y,Z")]
    spacing: Option<String>,
    /// Where the prompt generator sits.
    #[arg(long, default_value = "stage4", value_parser = ["stage4", "stage1"])]
    apg_input: String,
    /// Keep every encoder block's graph in stage 1 instead of recomputing each during the backward
    /// pass (faster, much more memory).
    #[arg(long)]
    no_checkpoint_blocks: bool,
    /// Stop after the epoch that passes this many minutes (a checkpoint is written; --resume goes on).
    #[arg(long)]
    max_minutes: Option<f64>,
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let result = match cli.command {
        Command::TrainTeacher(args) => train_teacher(args, cli.quiet),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn train_teacher(args: TrainTeacher, quiet: bool) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let dataset = Dataset::load(&args.data)?;
    let label_map = args.label_map.as_deref().map(LabelMap::load).transpose()?;
    let options = TrainOptions {
        stage: args.stage,
        epochs: args.epochs,
        warmup_epochs: args.warmup_epochs,
        lr: args.lr,
        samples_per_case: args.samples_per_case,
        val_every: args.val_every,
        seed: args.seed,
        checkpoint_blocks: !args.no_checkpoint_blocks,
        ..TrainOptions::default()
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let last = args.out.join("last.safetensors");
    let mut trainer = if args.resume {
        anyhow::ensure!(last.is_file(), "--resume: {} does not exist", last.display());
        TeacherTrainer::resume(&last, options, &device)?
    } else {
        let mut cfg = Config::preset(&args.preset).expect("clap checks the preset");
        if let Some(crop) = args.crop {
            cfg = cfg.with_crop(crop);
        }
        cfg.apg_input = args.apg_input.parse::<ApgInput>().map_err(anyhow::Error::msg)?;
        cfg.validate()?;
        let mut metadata = Metadata::teacher(&format!("autoprosam_{}", args.preset), cfg.clone());
        if let Some(text) = &args.spacing {
            let v: Vec<f64> = text
                .split(',')
                .map(|s| s.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))?;
            metadata.spacing = v.try_into().map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))?;
        }
        metadata.source = Some(format!("prosam-distill train-teacher on {}", args.data.display()));
        metadata.validate().map_err(anyhow::Error::msg)?;
        let init = match (&args.init, &args.sam) {
            (Some(path), _) => Init::File(path.clone()),
            (None, Some(sam)) => Init::Sam(sam.clone(), args.seed),
            (None, None) => Init::Random(args.seed),
        };
        TeacherTrainer::new(metadata, initial_weights(&cfg, &init)?, options, &device)?
    };
    let cache = args.cache.clone().unwrap_or_else(|| args.out.join("cache"));
    let t_load = Instant::now();
    let training = load_cases(&dataset, false, &trainer.metadata, label_map.as_ref(), Some(&cache))?;
    let validation = if dataset.validation.is_empty() {
        Vec::new()
    } else {
        load_cases(&dataset, true, &trainer.metadata, label_map.as_ref(), Some(&cache))?
    };
    let (trainable, total) = trainer.parameter_counts();
    if !quiet {
        eprintln!(
            "{} training and {} validation cases on a {:?} mm grid ({:.1} s); {trainable} of {total} parameters train in stage {}",
            training.len(),
            validation.len(),
            trainer.metadata.spacing,
            t_load.elapsed().as_secs_f64(),
            trainer.options.stage
        );
    }
    if trainer.epoch >= trainer.options.epochs {
        bail!(
            "the run in {} has finished its {} epochs (raise --epochs to go on)",
            args.out.display(),
            trainer.options.epochs
        );
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("log.jsonl"))
        .with_context(|| format!("{}: cannot open the log", args.out.display()))?;
    let steps_per_epoch = training.len() * trainer.options.samples_per_case;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new((trainer.options.epochs * steps_per_epoch) as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta} {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_position((trainer.epoch * steps_per_epoch) as u64);
        bar
    };
    let start = Instant::now();
    while trainer.epoch < trainer.options.epochs {
        let t0 = Instant::now();
        let epoch = trainer.epoch;
        let (loss, lr) = trainer.train_epoch(&training, &mut |_, _, l| {
            bar.inc(1);
            bar.set_message(format!("epoch {epoch} loss {l:.4}"));
        })?;
        let last_epoch = trainer.epoch == trainer.options.epochs;
        let out_of_time = args.max_minutes.is_some_and(|m| minutes_since(start) >= m);
        let validate =
            !validation.is_empty() && (trainer.epoch % trainer.options.val_every == 0 || last_epoch || out_of_time);
        let mut record = serde_json::json!({
            "epoch": epoch, "loss": loss, "lr": lr, "steps": steps_per_epoch,
            "train_seconds": t0.elapsed().as_secs_f64(),
        });
        if validate {
            let tv = Instant::now();
            let v = trainer.validate(&validation)?;
            if trainer.record_best(&v) {
                trainer.export(&args.out.join("best.safetensors"))?;
            }
            if !quiet {
                bar.suspend(|| eprintln!("epoch {epoch}: loss {loss:.4}, mean Dice {:.4} {:?}", v.mean_dice, v.dice));
            }
            record["dice"] = serde_json::to_value(&v.dice)?;
            record["mean_dice"] = v.mean_dice.into();
            record["mean_dice_with_background"] = v.mean_dice_with_background.into();
            record["validation_seconds"] = tv.elapsed().as_secs_f64().into();
        }
        trainer.save_checkpoint(&last)?;
        writeln!(log, "{record}")?;
        if out_of_time && !last_epoch {
            if !quiet {
                bar.suspend(|| {
                    eprintln!("stopping after {:.1} min (--max-minutes); --resume goes on", minutes_since(start))
                });
            }
            break;
        }
    }
    bar.finish_and_clear();
    trainer.export(&args.out.join("teacher.safetensors"))?;
    if !quiet {
        eprintln!(
            "{} epochs in {:.1} min; {}",
            trainer.epoch,
            minutes_since(start),
            args.out.join("teacher.safetensors").display()
        );
    }
    Ok(())
}
