//! `prosam-distill`: training prosam's networks on datasets in the Medical Segmentation Decathlon
//! layout. `train-teacher` trains the AutoProSAM teacher; `distill` trains a SwinUNETR student
//! from labels and a frozen teacher.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prosam_distill::augment::CropSampling;
use prosam_distill::data::{Case, Dataset, LabelMap};
use prosam_distill::loss::{KdLoss, inverse_sqrt_frequency_weights};
use prosam_distill::run::{RunFiles, run_epochs};
use prosam_distill::student::{DistillOptions, StudentTrainer, Teacher, student_random_weights};
use prosam_distill::teacher::{Init, TeacherTrainer, TrainOptions, initial_weights, load_cases};
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
    /// Train a SwinUNETR student on (1 - lambda) DiceCE(labels) + lambda KD(teacher).
    Distill(Distill),
    /// Copy a model file with its provenance set: what it was trained on and its licence (from a
    /// dataset.json), and its intended use. The weights are copied bit for bit.
    Provenance(Provenance),
}

#[derive(clap::Args)]
struct Provenance {
    /// The model file to copy.
    #[arg(short, long, value_name = "MODEL")]
    model: PathBuf,
    /// The dataset.json the model was trained on: its `name`, `description` and `licence`.
    #[arg(long, value_name = "dataset.json")]
    data: PathBuf,
    /// What the model is for, and what not.
    #[arg(long, value_name = "TEXT")]
    intended_use: Option<String>,
    /// A new name for the model's metadata.
    #[arg(long)]
    name: Option<String>,
    /// The copy (never the input).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
}

#[derive(clap::Args)]
struct Distill {
    /// The frozen teacher: a prosam model file (`train-teacher`'s teacher.safetensors, or any
    /// model with the same classes and spacing). Not needed with --lambda 0.
    #[arg(long, value_name = "TEACHER.safetensors")]
    teacher: Option<PathBuf>,
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small", "base"])]
    student: String,
    /// dataset.json: `training` (and `validation`) lists of {image, label} NIfTI paths, relative to the file.
    #[arg(long, value_name = "dataset.json")]
    data: PathBuf,
    /// Weight of the teacher term (0: labels only).
    #[arg(long, default_value_t = 0.5)]
    lambda: f64,
    /// mse (logits, the default), mse_prob (probabilities), kl or kl:T (temperature T).
    #[arg(long, default_value = "mse")]
    kd: String,
    /// Output folder: last.safetensors (checkpoint), log.jsonl, best.safetensors and student.safetensors.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Crop in voxels, N or X,Y,Z (multiples of 32, one of them at least 64): the student's window,
    /// and the teacher's crop (cubic then).
    #[arg(long, default_value = "64")]
    crop: String,
    /// Voxel spacing of the model grid in mm (default: the teacher's, else 1.5,1.5,2.0).
    #[arg(long, value_name = "X,Y,Z")]
    spacing: Option<String>,
    /// Starting weights: a prosam student file of the same size (default: PyTorch's init).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Name in the model file's metadata (default: prosam_<student>).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    #[arg(long, default_value_t = 2)]
    warmup_epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    samples_per_case: usize,
    /// Where crops are centred: pos_neg (MONAI's RandCropByPosNegLabeld, 2:1, the reference) or
    /// classes (RandCropByLabelClassesd with equal ratios: small organs as often as the liver).
    #[arg(long, default_value = "pos_neg")]
    crop_sampling: CropSampling,
    /// Class weights of the cross-entropy: none (the reference), inverse_sqrt (1/sqrt of each
    /// class's share of the training voxels: small organs weigh more) or one number per class,
    /// comma-separated.
    #[arg(long, default_value = "none")]
    ce_weight: String,
    #[arg(long, default_value_t = 5)]
    val_every: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, value_name = "FILE")]
    label_map: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    #[arg(long)]
    max_minutes: Option<f64>,
    /// What the student is for, and what not, recorded in its file (`prosam info` shows it with the
    /// data set's description and licence).
    #[arg(long, value_name = "TEXT")]
    intended_use: Option<String>,
}

/// Records in `metadata` where its training data came from and on what terms, then checks the
/// whole metadata.
fn set_provenance(metadata: &mut Metadata, dataset: &Dataset, intended_use: Option<&str>) -> anyhow::Result<()> {
    metadata.training_data = dataset.about.clone();
    metadata.licence = dataset.licence.clone();
    if let Some(text) = intended_use {
        metadata.intended_use = Some(text.to_string());
    }
    metadata.validate().map_err(|e| anyhow::anyhow!("{}: {e}", dataset.path.display()))
}

fn provenance(args: Provenance) -> anyhow::Result<()> {
    prosam_models::temp_file::check_output(&args.output, &[&args.model, &args.data])?;
    let dataset = Dataset::load(&args.data)?;
    let file = prosam_models::format::ModelFile::open(&args.model)?;
    let mut metadata = file.metadata().clone();
    if let Some(name) = &args.name {
        metadata.name = name.clone();
    }
    set_provenance(&mut metadata, &dataset, args.intended_use.as_deref())?;
    let mut tensors: Vec<_> = file.tensors(&candle_core::Device::Cpu)?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let written = prosam_models::format::save(&args.output, metadata, &tensors)?;
    anyhow::ensure!(
        written.checksum == file.metadata().checksum,
        "{}: the weights changed in the copy ({} became {})",
        args.output.display(),
        file.metadata().checksum,
        written.checksum
    );
    eprintln!("{}: {} with its provenance", args.output.display(), written.name);
    Ok(())
}

fn parse_spacing(text: &str) -> anyhow::Result<[f64; 3]> {
    let v: Vec<f64> = text
        .split(',')
        .map(|s| s.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))?;
    v.try_into().map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))
}

fn parse_crop(text: &str) -> anyhow::Result<[usize; 3]> {
    let v: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--crop takes N or X,Y,Z voxels, got `{text}`"))?;
    match v[..] {
        [n] => Ok([n; 3]),
        [x, y, z] => Ok([x, y, z]),
        _ => anyhow::bail!("--crop takes N or X,Y,Z voxels, got `{text}`"),
    }
}

/// The training and validation cases of `dataset` on `metadata`'s grid, cached under `cache`.
fn load_all(
    dataset: &Dataset,
    metadata: &Metadata,
    label_map: Option<&LabelMap>,
    cache: &Path,
    quiet: bool,
) -> anyhow::Result<(Vec<Case>, Vec<Case>)> {
    let t_load = Instant::now();
    let training = load_cases(dataset, false, metadata, label_map, Some(cache))?;
    let validation = if dataset.validation.is_empty() {
        Vec::new()
    } else {
        load_cases(dataset, true, metadata, label_map, Some(cache))?
    };
    if !quiet {
        eprintln!(
            "{} training and {} validation cases on a {:?} mm grid ({:.1} s)",
            training.len(),
            validation.len(),
            metadata.spacing,
            t_load.elapsed().as_secs_f64()
        );
    }
    Ok((training, validation))
}

fn distill(args: Distill, quiet: bool) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let dataset = Dataset::load(&args.data)?;
    let label_map = args.label_map.as_deref().map(LabelMap::load).transpose()?;
    let kd: KdLoss = args.kd.parse().map_err(anyhow::Error::msg)?;
    let options = DistillOptions {
        lambda: args.lambda,
        kd,
        crop: parse_crop(&args.crop)?,
        epochs: args.epochs,
        warmup_epochs: args.warmup_epochs,
        lr: args.lr,
        samples_per_case: args.samples_per_case,
        crop_sampling: args.crop_sampling,
        val_every: args.val_every,
        seed: args.seed,
        ..DistillOptions::default()
    };
    let teacher = match (&args.teacher, args.lambda > 0.0) {
        (Some(path), true) => {
            Some(Teacher::load(path, &device).with_context(|| format!("the teacher {}", path.display()))?)
        }
        (None, true) => {
            anyhow::bail!("--lambda {} needs --teacher (or --lambda 0 to train on the labels alone)", args.lambda)
        }
        (_, false) => None,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let last = args.out.join("last.safetensors");
    let mut trainer = if args.resume {
        anyhow::ensure!(last.is_file(), "--resume: {} does not exist", last.display());
        StudentTrainer::resume(&last, options, teacher, &device)?
    } else {
        let cfg = prosam_models::swin_unetr::Config::preset(&args.student).expect("clap checks the preset");
        let name = args.name.clone().unwrap_or_else(|| format!("prosam_{}", args.student));
        let mut metadata = Metadata { roi_size: options.crop, ..Metadata::btcv(&name, cfg.clone()) };
        if let Some(labels) = &dataset.labels
            && labels.len() == metadata.labels.len()
        {
            metadata.labels = labels.values().cloned().collect();
        }
        metadata.spacing = match (&args.spacing, &teacher) {
            (Some(text), _) => parse_spacing(text)?,
            (None, Some(t)) => t.metadata.spacing,
            (None, None) => metadata.spacing,
        };
        metadata.source = Some(format!(
            "prosam-distill distill on {} (lambda {}, teacher {})",
            args.data.display(),
            args.lambda,
            teacher.as_ref().map_or("none".into(), |t| format!("{} {}", t.metadata.name, t.metadata.checksum))
        ));
        set_provenance(&mut metadata, &dataset, args.intended_use.as_deref())?;
        let weights = match &args.init {
            Some(path) => {
                prosam_models::format::ModelFile::open(path)?.tensors(&device)?.into_iter().collect::<Vec<_>>()
            }
            None => student_random_weights(&cfg, args.seed)?,
        };
        StudentTrainer::new(metadata, weights, teacher, options, &device)?
    };
    let cache = args.cache.clone().unwrap_or_else(|| args.out.join("cache"));
    let (training, validation) = load_all(&dataset, &trainer.metadata, label_map.as_ref(), &cache, quiet)?;
    let saved = trainer.options.ce_weight.clone();
    let ce_weight = class_weights(
        &args.ce_weight,
        &training,
        trainer.cfg.out_channels,
        args.resume.then_some(saved.as_deref()),
        quiet,
    )?;
    trainer.set_ce_weight(ce_weight)?;
    if !quiet {
        eprintln!(
            "student {} ({} parameters), lambda {}, KD {:?}{}",
            args.student,
            trainer.parameter_count(),
            trainer.options.lambda,
            trainer.options.kd,
            trainer.teacher().map_or(String::new(), |t| format!(", teacher {}", t.metadata.name))
        );
    }
    let files = RunFiles { out: &args.out, model_name: "student.safetensors", max_minutes: args.max_minutes, quiet };
    run_epochs(&mut trainer, &training, &validation, &files)?;
    Ok(())
}

/// `--ce-weight`: none, inverse_sqrt (from the training labels' voxel counts) or `classes`
/// numbers, comma-separated. A resumed run (`resumed`: the checkpoint's weights) must ask for the
/// weights it was trained with.
fn class_weights(
    text: &str,
    training: &[Case],
    classes: usize,
    resumed: Option<Option<&[f64]>>,
    quiet: bool,
) -> anyhow::Result<Option<Vec<f64>>> {
    let weights = match text {
        "none" => None,
        "inverse_sqrt" => {
            let mut counts = vec![0u64; classes];
            for &label in training.iter().flat_map(|case| &case.labels) {
                // load_cases has checked every label against the class count.
                counts[label as usize] += 1;
            }
            Some(inverse_sqrt_frequency_weights(&counts))
        }
        list => {
            Some(list.split(',').map(|w| w.trim().parse::<f64>()).collect::<Result<Vec<_>, _>>().map_err(|_| {
                anyhow::anyhow!("--ce-weight takes none, inverse_sqrt or {classes} numbers, got `{list}`")
            })?)
        }
    };
    if let Some(saved) = resumed {
        anyhow::ensure!(
            saved == weights.as_deref(),
            "--resume: the checkpoint was trained with class weights {saved:?}, this run's --ce-weight gives {weights:?}"
        );
    }
    if !quiet && let Some(w) = &weights {
        eprintln!(
            "cross-entropy class weights: {}",
            w.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(weights)
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
    /// Where crops are centred: pos_neg (MONAI's RandCropByPosNegLabeld, 2:1, the reference) or
    /// classes (RandCropByLabelClassesd with equal ratios: small organs as often as the liver).
    #[arg(long, default_value = "pos_neg")]
    crop_sampling: CropSampling,
    /// Class weights of the cross-entropy, as for `distill`: none (the reference), inverse_sqrt or
    /// one number per class, comma-separated.
    #[arg(long, default_value = "none")]
    ce_weight: String,
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
    prosam_runtime::resources::retain_freed_memory();
    let cli = Cli::parse();
    let result = (|| {
        if let Some(n) = cli.threads {
            prosam_runtime::resources::check_threads(n).map_err(|e| anyhow::anyhow!("--threads: {e}"))?;
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        match cli.command {
            Command::TrainTeacher(args) => train_teacher(args, cli.quiet),
            Command::Distill(args) => distill(args, cli.quiet),
            Command::Provenance(args) => provenance(args),
        }
    })();
    if let Err(e) = result {
        eprintln!("error: {}", prosam_runtime::error::chain_text(&e));
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
        crop_sampling: args.crop_sampling,
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
            metadata.spacing = parse_spacing(text)?;
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
    let (training, validation) = load_all(&dataset, &trainer.metadata, label_map.as_ref(), &cache, quiet)?;
    let saved = trainer.options.ce_weight.clone();
    let ce_weight =
        class_weights(&args.ce_weight, &training, trainer.cfg.n_out, args.resume.then_some(saved.as_deref()), quiet)?;
    trainer.set_ce_weight(ce_weight)?;
    let (trainable, total) = trainer.parameter_counts();
    if !quiet {
        eprintln!("{trainable} of {total} parameters train in stage {}", trainer.options.stage);
    }
    let files = RunFiles { out: &args.out, model_name: "teacher.safetensors", max_minutes: args.max_minutes, quiet };
    run_epochs(&mut trainer, &training, &validation, &files)?;
    Ok(())
}
