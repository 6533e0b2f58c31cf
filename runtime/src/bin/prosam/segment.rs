//! `prosam segment`: a CT in, an organ label map out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use prosam_runtime::engine::{SegmentOptions, Segmenter, label_stats};
use prosam_runtime::pipeline::Blend;
use prosam_runtime::resources;
use prosam_runtime::volume::nifti;

#[derive(clap::Args)]
pub struct Args {
    /// The prosam model file.
    #[arg(short, long, value_name = "MODEL")]
    model: PathBuf,
    /// The CT: a NIfTI-1 file (.nii or .nii.gz) in HU.
    #[arg(short, long, value_name = "CT.nii.gz")]
    input: PathBuf,
    /// The label map to write (.nii or .nii.gz), uint8, on the CT's grid.
    #[arg(short, long, value_name = "SEG.nii.gz")]
    output: PathBuf,
    /// Fraction of a window shared with its neighbour, in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    overlap: f64,
    /// How overlapping windows are weighted.
    #[arg(long, default_value = "gaussian", value_parser = ["gaussian", "constant"])]
    blend: String,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Also write per-organ statistics (voxels, volume in mL, world bounding box) as JSON.
    #[arg(long, value_name = "FILE.json")]
    stats: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// Fails early, before minutes of inference, when the output cannot be written.
fn check_output(output: &Path) -> anyhow::Result<()> {
    let name = output.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !(name.ends_with(".nii") || name.ends_with(".nii.gz")) {
        bail!("{}: the output must end in .nii or .nii.gz", output.display());
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("{}: the output folder {} does not exist", output.display(), dir.display());
    }
    let probe = dir.join(format!(".prosam-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("{}: cannot write in {}", output.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn run(args: Args, quiet: bool) -> anyhow::Result<()> {
    super::ensure_distinct(&args.output, &[&args.input, &args.model])?;
    if let Some(stats) = &args.stats {
        super::ensure_distinct(stats, &[&args.input, &args.model, &args.output])?;
    }
    check_output(&args.output)?;
    let blend: Blend = args.blend.parse().map_err(anyhow::Error::msg)?;
    let options = SegmentOptions { overlap: args.overlap, blend, batch: args.batch };

    let t_read = Instant::now();
    let segmenter = Segmenter::load(&args.model, options)?;
    let input = nifti::read(&args.input)?;
    let read_s = t_read.elapsed().as_secs_f64();
    let meta = segmenter.metadata().clone();

    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, {elapsed} elapsed, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("segmenting {}", args.input.display()));
    let affine = input.volume.affine;
    let header = input.header;
    let result = segmenter.segment(input.volume, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();

    let t_write = Instant::now();
    let description = format!("prosam {} {} {}", env!("CARGO_PKG_VERSION"), meta.name, meta.checksum);
    nifti::write_labels(&args.output, &result.labels, result.dims, &header, &description)?;
    let stats = label_stats(&result.labels, result.dims, &affine, &meta.labels);
    let provenance = serde_json::json!({
        "prosam_version": env!("CARGO_PKG_VERSION"),
        "model": meta.name,
        "model_checksum": meta.checksum,
        "input": args.input,
        "output": args.output,
    });
    if let Some(path) = &args.stats {
        let report = serde_json::json!({ "provenance": provenance, "organs": stats });
        let text = serde_json::to_string_pretty(&report)? + "\n";
        prosam_models::format::write_atomically(path, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    }
    let write_s = t_write.elapsed().as_secs_f64();
    let t = result.times;
    let peak = resources::peak_rss_mib();
    if args.json {
        let summary = serde_json::json!({
            "provenance": provenance,
            "dims": result.dims,
            "windows": result.windows,
            "times_s": {
                "read": read_s,
                "preprocess": t.preprocess.as_secs_f64(),
                "infer": t.infer.as_secs_f64(),
                "restore": t.restore.as_secs_f64(),
                "write": write_s,
            },
            "peak_rss_mib": peak,
            "organs": stats,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if !quiet {
        eprintln!(
            "{} -> {}: read {read_s:.2} s, preprocess {:.2} s, infer {:.2} s ({} windows), restore {:.2} s, write {write_s:.2} s; peak RSS {}",
            args.input.display(),
            args.output.display(),
            t.preprocess.as_secs_f64(),
            t.infer.as_secs_f64(),
            result.windows,
            t.restore.as_secs_f64(),
            peak.map_or("?".into(), |m| format!("{m:.0} MiB")),
        );
    }
    Ok(())
}
