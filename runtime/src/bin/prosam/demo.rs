//! `prosam demo`: the whole job on data made on the spot. A synthetic phantom with known organs
//! is generated, segmented by the built-in model (or `-m`), and the result is scored against
//! the phantom's truth.

use std::path::PathBuf;
use std::time::Instant;

use prosam_runtime::device::DeviceChoice;
use prosam_runtime::engine::{SegmentOptions, Segmenter};
use prosam_runtime::phantom::{PhantomOptions, generate};
use prosam_runtime::pipeline::postprocess::LabelOptions;
use prosam_runtime::volume::{Volume, nifti};

#[derive(clap::Args)]
pub struct Args {
    /// A prosam model file (default: the built-in model).
    #[arg(short, long, value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Folder for phantom.nii.gz (the CT), truth.nii.gz (its labels) and segmentation.nii.gz.
    #[arg(long, default_value = "prosam-demo", value_name = "DIR")]
    out: PathBuf,
    /// The phantom's seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print `{"mean_dice": ..., "dice": {organ: ...}, ...}` on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, device: DeviceChoice, quiet: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out).map_err(|e| anyhow::anyhow!("{}: cannot create ({e})", args.out.display()))?;
    let segmenter = match &args.model {
        Some(path) => Segmenter::load_on(path, SegmentOptions::default(), device, None)?,
        None => {
            if !quiet {
                eprintln!("{}", prosam_runtime::zoo::BUILT_IN_NOTICE);
            }
            Segmenter::from_file(prosam_runtime::zoo::built_in_model()?, SegmentOptions::default(), device, None)?
        }
    };
    let meta = segmenter.metadata().clone();
    let phantom = generate(args.seed, &PhantomOptions::default());
    let (ct, truth, seg) =
        (args.out.join("phantom.nii.gz"), args.out.join("truth.nii.gz"), args.out.join("segmentation.nii.gz"));
    let description = format!("prosam synthetic phantom, seed {}, {}", args.seed, phantom.phase);
    nifti::write_ct(&ct, &phantom.image, &description)?;
    let header = nifti::header_for(&phantom.image.affine, phantom.image.dims);
    nifti::write_labels(&truth, &phantom.labels, phantom.image.dims, &header, &description)?;
    let t_made = t0.elapsed().as_secs_f64();
    if !quiet {
        eprintln!(
            "phantom seed {} ({}, {:?} voxels at {:.2?} mm) -> {}",
            args.seed,
            phantom.phase,
            phantom.image.dims,
            phantom.image.affine.spacing(),
            ct.display()
        );
    }
    // Segment the CT as written (int16, the header's affine), so that the result is the one
    // `prosam segment` gives on that file.
    let written = nifti::read(&ct)?.volume;
    let affine = written.affine;
    let bar = crate::progress_bar(0, "windows", quiet);
    let result = segmenter.segment(written, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();
    let mut labels = result.labels;
    LabelOptions::solid(&meta.labels).apply(&mut labels, result.dims);
    nifti::write_labels(
        &seg,
        &labels,
        result.dims,
        &header,
        &format!("prosam {} {}", env!("CARGO_PKG_VERSION"), meta.name),
    )?;
    let as_volume = |l: &[u8]| Volume { dims: result.dims, data: l.iter().map(|&v| v as f32).collect(), affine };
    let metrics = crate::eval::compare(&as_volume(&labels), &as_volume(&phantom.labels), (&seg, &truth), 2.0)?;
    let seconds = t0.elapsed().as_secs_f64();
    if args.json {
        let mut report = crate::eval::report(&metrics, 2.0);
        report["model"] = serde_json::json!(meta.name);
        report["seed"] = serde_json::json!(args.seed);
        report["phase"] = serde_json::json!(phantom.phase);
        report["files"] = serde_json::json!({"ct": ct.to_string_lossy(), "truth": truth.to_string_lossy(), "segmentation": seg.to_string_lossy()});
        report["seconds"] = serde_json::json!({"phantom": t_made, "segment": result.times.preprocess.as_secs_f64() + result.times.infer.as_secs_f64() + result.times.restore.as_secs_f64(), "total": seconds});
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        crate::eval::print_table(&metrics, 2.0)?;
    }
    if !quiet {
        eprintln!(
            "{} windows; {:.1} s in all; the truth is {}, the segmentation {}",
            result.windows,
            seconds,
            truth.display(),
            seg.display()
        );
    }
    Ok(())
}
