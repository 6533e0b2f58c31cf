//! `prosam eval`: Dice, normalized surface Dice and HD95 of a label map against the truth, per
//! organ, as MONAI computes them (see `prosam_runtime::metrics`).

use std::path::{Path, PathBuf};

use prosam_models::format::BTCV_LABELS;
use prosam_runtime::metrics::{ClassMetrics, evaluate, mean_finite};
use prosam_runtime::volume::{Volume, nifti};

#[derive(clap::Args)]
pub struct Args {
    /// The predicted label map (NIfTI).
    #[arg(long, value_name = "SEG")]
    pred: PathBuf,
    /// The reference label map on the same grid (NIfTI).
    #[arg(long, value_name = "LABELS")]
    truth: PathBuf,
    /// Renumber the truth's labels first with a JSON object {"source": target, ...} (as
    /// prosam-distill's --label-map; unlisted values become background), e.g. TotalSegmentator's
    /// labels to BTCV's.
    #[arg(long, value_name = "FILE.json")]
    truth_map: Option<PathBuf>,
    /// Surface distance counted as agreement by the normalized surface Dice, in mm.
    #[arg(long, default_value_t = 2.0, value_name = "MM")]
    tolerance_mm: f64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// Reads a label map: whole numbers in 0..=255.
pub(crate) fn read_labels(path: &Path) -> anyhow::Result<Volume> {
    let v = nifti::read(path)?.volume;
    if let Some(bad) = v.data.iter().find(|x| !(x.fract() == 0.0 && (0.0..=255.0).contains(*x))) {
        anyhow::bail!("{}: not a label map (a voxel holds {bad}; labels are whole numbers 0..255)", path.display());
    }
    Ok(v)
}

/// The two maps' per-class figures, after checking that they share a grid.
pub(crate) fn compare(
    pred: &Volume,
    truth: &Volume,
    names: (&Path, &Path),
    tolerance_mm: f64,
) -> anyhow::Result<Vec<ClassMetrics>> {
    anyhow::ensure!(
        pred.dims == truth.dims,
        "{} is {:?} voxels and {} is {:?}: the maps must share a grid",
        names.0.display(),
        pred.dims,
        names.1.display(),
        truth.dims
    );
    let off = (0..3)
        .flat_map(|i| (0..4).map(move |j| (i, j)))
        .map(|(i, j)| (pred.affine.0[i][j] - truth.affine.0[i][j]).abs())
        .fold(0.0, f64::max);
    anyhow::ensure!(
        off < 1e-3,
        "{} and {} have different affines (by up to {off:.4} mm): the maps must share a grid",
        names.0.display(),
        names.1.display()
    );
    let to_u8 = |v: &Volume| v.data.iter().map(|&x| x as u8).collect::<Vec<u8>>();
    let (p, t) = (to_u8(pred), to_u8(truth));
    let classes = p.iter().chain(&t).copied().max().unwrap_or(0).max(BTCV_LABELS.len() as u8 - 1) + 1;
    let all = evaluate(&p, &t, pred.dims, truth.affine.spacing(), classes, tolerance_mm);
    Ok(all.into_iter().filter(|m| m.pred_voxels + m.truth_voxels > 0).collect())
}

pub(crate) fn class_name(label: u8) -> String {
    BTCV_LABELS.get(label as usize).map_or_else(|| format!("label_{label}"), |s| s.to_string())
}

/// The JSON report: per organ and the means over organs with a finite value.
pub(crate) fn report(metrics: &[ClassMetrics], tolerance_mm: f64) -> serde_json::Value {
    let organs: serde_json::Map<String, serde_json::Value> =
        metrics.iter().map(|m| (class_name(m.label), serde_json::to_value(m).expect("metrics serialise"))).collect();
    let finite_or_null = |v: f64| if v.is_finite() { serde_json::Value::from(v) } else { serde_json::Value::Null };
    serde_json::json!({
        "tolerance_mm": tolerance_mm,
        "mean_dice": finite_or_null(mean_finite(metrics.iter().map(|m| m.dice))),
        "mean_nsd": finite_or_null(mean_finite(metrics.iter().map(|m| m.nsd))),
        "mean_hd95_mm": finite_or_null(mean_finite(metrics.iter().map(|m| m.hd95))),
        "dice": metrics.iter().map(|m| (class_name(m.label), finite_or_null(m.dice))).collect::<serde_json::Map<_, _>>(),
        "organs": organs,
    })
}

pub(crate) fn print_table(metrics: &[ClassMetrics], tolerance_mm: f64) -> std::io::Result<()> {
    let f = |v: f64, digits: usize| {
        if v.is_nan() {
            "-".to_string()
        } else if v.is_infinite() {
            "inf".into()
        } else {
            format!("{v:.digits$}")
        }
    };
    outln!(
        "{:<26} {:>7} {:>7} {:>10} {:>10} {:>10}",
        "organ",
        "Dice",
        format!("NSD@{tolerance_mm}"),
        "HD95 mm",
        "predicted",
        "truth"
    )?;
    for m in metrics {
        outln!(
            "{:<26} {:>7} {:>7} {:>10} {:>10} {:>10}",
            class_name(m.label),
            f(m.dice, 4),
            f(m.nsd, 4),
            f(m.hd95, 2),
            m.pred_voxels,
            m.truth_voxels
        )?;
    }
    outln!(
        "{:<26} {:>7} {:>7} {:>10}",
        "mean",
        f(mean_finite(metrics.iter().map(|m| m.dice)), 4),
        f(mean_finite(metrics.iter().map(|m| m.nsd)), 4),
        f(mean_finite(metrics.iter().map(|m| m.hd95)), 2)
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tolerance_mm >= 0.0 && args.tolerance_mm.is_finite(),
        "--tolerance-mm must be a distance >= 0"
    );
    let pred = read_labels(&args.pred)?;
    let mut truth = read_labels(&args.truth)?;
    if let Some(path) = &args.truth_map {
        let map = prosam_runtime::label_map::LabelMap::load(path)?;
        truth.data.iter_mut().for_each(|v| *v = map.apply(*v as u8) as f32);
    }
    let metrics = compare(&pred, &truth, (&args.pred, &args.truth), args.tolerance_mm)?;
    if args.json {
        let mut r = report(&metrics, args.tolerance_mm);
        r["pred"] = serde_json::json!(args.pred.to_string_lossy());
        r["truth"] = serde_json::json!(args.truth.to_string_lossy());
        outln!("{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        print_table(&metrics, args.tolerance_mm)?;
    }
    Ok(())
}
