//! `prosam segment`: a CT in, an organ label map out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use prosam_runtime::device::DeviceChoice;
use prosam_runtime::engine::{SegmentOptions, Segmenter};
use prosam_runtime::memory::{MemoryBudget, VolumeShape};
use prosam_runtime::pipeline::Blend;
use prosam_runtime::pipeline::postprocess::{LabelOptions, label_stats};
use prosam_runtime::resources;
use prosam_runtime::volume::{CtInput, dicom_seg, nifti};

#[derive(clap::Args)]
pub struct Args {
    /// The prosam model file (default: the built-in model prosam_ct_tiny, trained on synthetic
    /// CTs built around the BTCV label maps; research use only).
    #[arg(short, long, value_name = "MODEL")]
    model: Option<PathBuf>,
    /// The CT: a NIfTI-1 file (.nii or .nii.gz) in HU, or a folder holding a DICOM CT series.
    #[arg(short, long, value_name = "CT")]
    input: PathBuf,
    /// The label map to write: NIfTI (.nii, .nii.gz; uint8 on the CT's grid), or a DICOM-SEG
    /// (.dcm; DICOM input only).
    #[arg(short, long, value_name = "SEG.nii.gz|SEG.dcm")]
    output: PathBuf,
    /// Also write a DICOM-SEG (DICOM input only).
    #[arg(long, value_name = "SEG.dcm")]
    dicom_seg: Option<PathBuf>,
    /// The DICOM series to segment when the folder holds several: its SeriesInstanceUID, or its
    /// number in `prosam dicom-info`'s listing.
    #[arg(long, value_name = "UID|N")]
    series: Option<String>,
    /// Keep only these organs (names from the model's label map, comma-separated).
    #[arg(long, value_name = "NAME,NAME,...")]
    organs: Option<String>,
    /// Which organs get the largest connected component kept and their holes filled: `solid`
    /// (the solid organs: spleen, kidneys, gallbladder, liver, stomach, pancreas, adrenals),
    /// `none`, `all`, or a comma-separated list of names.
    #[arg(long, default_value = "solid", value_name = "solid|none|all|NAME,...")]
    postprocess: String,
    /// Fraction of a window shared with its neighbour, in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    overlap: f64,
    /// How overlapping windows are weighted.
    #[arg(long, default_value = "gaussian", value_parser = ["gaussian", "constant"])]
    blend: String,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Also write per-organ statistics (voxels, volume in mL, world bounding box, HU mean and
    /// standard deviation, whether the scan's edge cuts the organ) as JSON.
    #[arg(long, value_name = "FILE.json")]
    stats: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Refuse, before reading the voxels, a CT whose run would need more memory than this
    /// (4G, 512M, ...; default and cap: 90% of the process's effective limit, the smallest of
    /// physical memory, the cgroup's memory.max and `ulimit -v`).
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
}

/// What an output path is, by its name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OutputKind {
    Nifti,
    DicomSeg,
}

/// What an output is by its name; whether it can be written was checked with the others
/// ([`super::check_output_path`]).
fn check_output(output: &Path) -> anyhow::Result<OutputKind> {
    let name = output.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let kind = if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        OutputKind::Nifti
    } else if name.ends_with(".dcm") {
        OutputKind::DicomSeg
    } else {
        bail!("{}: the output must end in .nii, .nii.gz or .dcm", output.display());
    };
    Ok(kind)
}

pub fn run(args: Args, device: DeviceChoice, quiet: bool) -> anyhow::Result<()> {
    let mut outputs = vec![args.output.clone()];
    outputs.extend(args.dicom_seg.clone());
    outputs.extend(args.stats.clone());
    let input_dir = args.input.is_dir().then(|| args.input.canonicalize().ok()).flatten();
    for (n, out) in outputs.iter().enumerate() {
        let mut others: Vec<&Path> = vec![&args.input];
        others.extend(args.model.as_deref());
        others.extend(outputs[..n].iter().map(PathBuf::as_path));
        super::check_output_path(out, &others)?;
        let out_dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.canonicalize().ok(),
            _ => std::env::current_dir().ok(),
        };
        if let (Some(input_dir), Some(out_dir)) = (&input_dir, out_dir) {
            anyhow::ensure!(
                !out_dir.starts_with(input_dir),
                "{}: the output is inside the input folder {}; write it elsewhere so that the next run does not \
                 read it as part of the series",
                out.display(),
                args.input.display()
            );
        }
    }
    let output_kind = check_output(&args.output)?;
    if let Some(seg) = &args.dicom_seg {
        anyhow::ensure!(check_output(seg)? == OutputKind::DicomSeg, "{}: --dicom-seg must end in .dcm", seg.display());
    }
    let wants_seg = output_kind == OutputKind::DicomSeg || args.dicom_seg.is_some();
    anyhow::ensure!(
        !wants_seg || args.input.is_dir(),
        "a DICOM-SEG output needs a DICOM series as input (a folder); {} is not one",
        args.input.display()
    );
    let budget = match &args.max_memory {
        Some(text) => MemoryBudget::parse(text).map_err(|e| anyhow::anyhow!("--max-memory: {e}"))?.capped(),
        None => MemoryBudget::effective(),
    };
    let blend: Blend = args.blend.parse().map_err(anyhow::Error::msg)?;
    let options = SegmentOptions { overlap: args.overlap, blend, batch: args.batch };

    let t_read = Instant::now();
    let segmenter = match &args.model {
        Some(path) => Segmenter::load_on(path, options, device, None)?,
        None => {
            if !quiet {
                eprintln!("{}", prosam_runtime::zoo::BUILT_IN_NOTICE);
            }
            Segmenter::from_file(prosam_runtime::zoo::built_in_model()?, options, device, None)?
        }
    };
    let meta = segmenter.metadata().clone();
    let label_options = LabelOptions::parse(&args.postprocess, args.organs.as_deref(), &meta.labels)
        .context("--postprocess / --organs")?;
    let estimate = std::cell::Cell::new(0u64);
    let admit = |shape: &VolumeShape| {
        let need = segmenter.memory_need(shape);
        estimate.set(estimate.get().max(need));
        budget.check(need, || {
            let [x, y, z] = shape.dims;
            format!("{}: segmenting {x} x {y} x {z} voxels", args.input.display())
        })
    };
    let mut input = CtInput::read(&args.input, args.series.as_deref(), &admit)?;
    let read_s = t_read.elapsed().as_secs_f64();
    if let CtInput::Dicom(d) = &input
        && !quiet
    {
        eprintln!("{}: series {}", args.input.display(), d.series.label());
    }
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, {elapsed} elapsed, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("segmenting {}", args.input.display()));
    let affine = input.volume().affine;
    let result = segmenter.segment(input.take_volume(), &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();

    let t_post = Instant::now();
    let mut labels = result.labels;
    let cleaned = label_options.apply(&mut labels, result.dims);
    let post_s = t_post.elapsed().as_secs_f64();

    let t_write = Instant::now();
    let description = format!("prosam {} {} {}", env!("CARGO_PKG_VERSION"), meta.name, meta.checksum);
    if output_kind == OutputKind::Nifti {
        nifti::write_labels(&args.output, &labels, result.dims, &input.nifti_header(), &description)?;
    }
    let mut seg_summary = None;
    if let CtInput::Dicom(dicom) = &input {
        let algorithm = dicom_seg::Algorithm {
            model_name: meta.name.clone(),
            model_checksum: meta.checksum.clone(),
            prosam_version: env!("CARGO_PKG_VERSION").into(),
        };
        for path in std::iter::once(&args.output).filter(|_| output_kind == OutputKind::DicomSeg).chain(&args.dicom_seg)
        {
            let summary = dicom_seg::write(path, dicom, &labels, &meta.labels, &algorithm)?;
            if !quiet {
                summary.notes.iter().for_each(|n| eprintln!("note: {}: {n}", path.display()));
            }
            seg_summary = Some(summary);
        }
    }
    // The CT's HU for the statistics: read again rather than kept through inference, which
    // would hold a second copy of the volume at the peak.
    let ct = if args.stats.is_some() || args.json {
        Some(CtInput::read(&args.input, args.series.as_deref(), &admit)?)
    } else {
        None
    };
    let stats = label_stats(&labels, result.dims, &affine, &meta.labels, ct.as_ref().map(CtInput::volume));
    let provenance = serde_json::json!({
        "prosam_version": env!("CARGO_PKG_VERSION"),
        "model": meta.name,
        "model_checksum": meta.checksum,
        "input": args.input.to_string_lossy(),
        "output": args.output.to_string_lossy(),
        "series": match &input {
            CtInput::Dicom(d) => Some(d.series.uid.clone()),
            CtInput::Nifti(_) => None,
        },
        "organs_kept": label_options.keep,
        "postprocessed": label_options.clean,
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
                "postprocess": post_s,
                "write": write_s,
            },
            "postprocess": cleaned,
            "dicom_seg": seg_summary,
            "peak_rss_mib": peak,
            "memory_estimate_mib": estimate.get() as f64 / (1u64 << 20) as f64,
            "organs": stats,
        });
        outln!("{}", serde_json::to_string_pretty(&summary)?)?;
    }
    if !quiet {
        eprintln!(
            "{} -> {}: read {read_s:.2} s, preprocess {:.2} s, infer {:.2} s ({} windows), restore {:.2} s, postprocess {post_s:.2} s, write {write_s:.2} s; peak RSS {} (estimated {})",
            args.input.display(),
            args.output.display(),
            t.preprocess.as_secs_f64(),
            t.infer.as_secs_f64(),
            result.windows,
            t.restore.as_secs_f64(),
            peak.map_or("?".into(), |m| format!("{m:.0} MiB")),
            prosam_runtime::memory::format_bytes(estimate.get()),
        );
    }
    Ok(())
}
