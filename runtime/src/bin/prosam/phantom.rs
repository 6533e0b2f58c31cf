//! `prosam phantom`: synthetic abdominal CTs with their organ labels, in the Medical Segmentation
//! Decathlon layout that `prosam-distill` reads: drawn phantoms, or CTs built around real organ
//! label maps (`--anatomy`).

use std::path::PathBuf;
use std::sync::Arc;

use prosam_runtime::phantom::{Bowel, LabelAnatomy, PhantomOptions, write_anatomy_dataset, write_dataset};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder: imagesTr/, labelsTr/ and dataset.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    cases: usize,
    /// The first case's seed; case n has seed S + n.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// List the last N cases under `validation` instead of `training`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    validation: usize,
    /// In-plane voxel size range in mm [default: 1.0,1.6; with --anatomy 0.6,1.0].
    #[arg(long, value_name = "MIN,MAX")]
    in_plane: Option<String>,
    /// Slice spacing range in mm [default: 2.0,3.5; with --anatomy 1.0,5.0].
    #[arg(long, value_name = "MIN,MAX")]
    slice: Option<String>,
    /// Build each CT around a real organ label map from this folder (`*.nii.gz`, the 14 BTCV
    /// labels, isotropic voxels; research data: see its licence) instead of drawn organs.
    #[arg(long, value_name = "DIR")]
    anatomy: Option<PathBuf>,
    /// How the label maps' voxels are stored, when their affine does not say it right: `LAS` for
    /// the BTCV release (axis 0 toward the patient's left under an affine that claims RAS).
    /// Without it the affine is trusted; a map whose liver then lies on the patient's left is
    /// refused.
    #[arg(long, value_name = "CODES", requires = "anatomy")]
    anatomy_axes: Option<String>,
    /// Label maps (file names without .nii.gz, comma-separated) kept for the --validation cases
    /// only: validation on anatomy that training never saw.
    #[arg(long, value_name = "NAME,...", requires = "anatomy")]
    held_out: Option<String>,
    /// What fills the free peritoneal space around the real organs: `packed` (small bowel and
    /// colon loops with fluid, oral contrast, gas or stool, as in a real abdomen) or `loops` (a
    /// few loops in visceral fat, as the drawn phantoms have).
    #[arg(long, value_enum, default_value_t = Bowel::Packed, requires = "anatomy")]
    bowel: Bowel,
    /// Share of the cases whose scan is a thin slab (40-100 mm) through the organs, thinner than a
    /// network's window (0 for none).
    #[arg(long, default_value_t = 0.2, value_name = "P", requires = "anatomy")]
    thin_fov: f64,
    /// Store every case in RAS order (default: random axis flips, as scanners and converters vary).
    #[arg(long)]
    ras: bool,
    /// Print the written cases as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub(crate) fn range(text: &str, what: &str) -> anyhow::Result<(f64, f64)> {
    let v: Vec<f64> = text
        .split(',')
        .map(|s| s.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("{what} takes two numbers MIN,MAX in mm, got `{text}`"))?;
    anyhow::ensure!(
        v.len() == 2 && v[0] > 0.0 && v[0] <= v[1] && v[1] <= 20.0,
        "{what} takes MIN,MAX with 0 < MIN <= MAX <= 20 mm, got `{text}`"
    );
    Ok((v[0], v[1]))
}

pub fn run(args: Args, quiet: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.cases > 0, "--cases must be at least 1");
    anyhow::ensure!(
        args.validation <= args.cases,
        "--validation {} is more than --cases {}",
        args.validation,
        args.cases
    );
    anyhow::ensure!((0.0..=1.0).contains(&args.thin_fov), "--thin-fov takes a share in 0..1, got {}", args.thin_fov);
    let real = args.anatomy.is_some();
    let options = PhantomOptions {
        in_plane_mm: range(args.in_plane.as_deref().unwrap_or(if real { "0.6,1.0" } else { "1.0,1.6" }), "--in-plane")?,
        slice_mm: range(args.slice.as_deref().unwrap_or(if real { "1.0,5.0" } else { "2.0,3.5" }), "--slice")?,
        random_orientation: !args.ras,
        bowel: args.bowel,
        thin_fov: args.thin_fov,
        ..PhantomOptions::default()
    };
    let seeds: Vec<u64> = (0..args.cases as u64).map(|n| args.seed + n).collect();
    let bar = crate::progress_bar(args.cases as u64, "cases", quiet);
    let t0 = std::time::Instant::now();
    let mut progress = |c: &prosam_runtime::phantom::WrittenCase| {
        bar.inc(1);
        bar.set_message(format!("seed {} ({}, {:?} voxels)", c.seed, c.phase, c.dims));
    };
    let written = match &args.anatomy {
        None => write_dataset(&args.out, &seeds, args.validation, &options, &mut progress)?,
        Some(dir) => {
            let (training, held_out) = read_anatomies(dir, args.anatomy_axes.as_deref(), args.held_out.as_deref())?;
            anyhow::ensure!(
                held_out.is_empty() || args.validation > 0,
                "--held-out anatomies are used for the --validation cases only; give --validation N"
            );
            write_anatomy_dataset(&args.out, &seeds, args.validation, &training, &held_out, &options, &mut progress)?
        }
    };
    bar.finish_and_clear();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&written)?)?;
    }
    if !quiet {
        eprintln!(
            "{} synthetic phantoms in {:.1} s: {}",
            written.len(),
            t0.elapsed().as_secs_f64(),
            args.out.join("dataset.json").display()
        );
    }
    Ok(())
}

type Anatomies = Vec<Arc<LabelAnatomy>>;

/// The label maps in `dir` (`*.nii.gz`, `*.nii`, by name), read and checked, split into those for
/// training and those `held_out` names.
fn read_anatomies(
    dir: &std::path::Path,
    axes: Option<&str>,
    held_out: Option<&str>,
) -> anyhow::Result<(Anatomies, Anatomies)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".nii.gz") || p.extension().is_some_and(|e| e == "nii"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{}: no label maps (.nii.gz) in the folder", dir.display());
    let stem = |p: &std::path::Path| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.trim_end_matches(".gz").trim_end_matches(".nii").to_string()
    };
    let wanted: Vec<String> =
        held_out.map(|h| h.split(',').map(|s| s.trim().to_string()).collect()).unwrap_or_default();
    for name in &wanted {
        anyhow::ensure!(files.iter().any(|f| stem(f) == *name), "--held-out: no label map {name} in {}", dir.display());
    }
    let (mut training, mut validation) = (Vec::new(), Vec::new());
    for file in &files {
        let anatomy = Arc::new(LabelAnatomy::read(file, axes)?);
        if wanted.contains(&stem(file)) { validation.push(anatomy) } else { training.push(anatomy) }
    }
    anyhow::ensure!(!training.is_empty(), "--held-out leaves no label map for training");
    Ok((training, validation))
}
