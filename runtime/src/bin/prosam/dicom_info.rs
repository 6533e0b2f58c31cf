//! `prosam dicom-info`: the DICOM series in a folder, and what would stop each from being segmented.

use std::collections::BTreeSet;
use std::path::PathBuf;

use prosam_runtime::volume::dicom;

#[derive(clap::Args)]
pub struct Args {
    /// A folder with DICOM files (searched recursively).
    #[arg(value_name = "DICOM_FOLDER")]
    folder: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let scan = dicom::scan(&args.folder)?;
    // Each series' checks once, for the JSON and the text alike.
    let checked: Vec<_> = scan
        .series
        .iter()
        .map(|series| {
            let syntaxes: BTreeSet<String> =
                series.slices.iter().map(|s| dicom::transfer_syntax(&s.transfer_syntax).0).collect();
            (series.geometry(), syntaxes)
        })
        .collect();
    let mut reports = Vec::new();
    for (n, (series, (checks, syntaxes))) in scan.series.iter().zip(&checked).enumerate() {
        let first = &series.slices[0];
        let (geometry, problems) = match checks {
            Ok(g) => (Some(g), &Vec::new()),
            Err(p) => (None, p),
        };
        let positions: Vec<f64> = series.slices.iter().map(|s| s.position[2]).collect();
        reports.push(serde_json::json!({
            "number": n + 1,
            "series_instance_uid": series.uid,
            "series_number": series.number,
            "description": series.description,
            "modality": series.modality,
            "slices": series.slices.len(),
            "rows": first.rows,
            "columns": first.columns,
            "pixel_spacing": first.pixel_spacing,
            "orientation": first.orientation,
            "plane": dicom::plane(&first.orientation),
            "transfer_syntaxes": syntaxes,
            "dims": geometry.as_ref().map(|g| g.dims),
            "spacing": geometry.as_ref().map(|g| g.spacing),
            "affine_ras": geometry.as_ref().map(|g| g.affine.0),
            "z_range": [positions.iter().copied().fold(f64::INFINITY, f64::min), positions.iter().copied().fold(f64::NEG_INFINITY, f64::max)],
            "frame_of_reference_uid": series.frame_of_reference_uid,
            "study_instance_uid": series.study.study_instance_uid,
            "segmentable": problems.is_empty(),
            "problems": problems,
        }));
    }
    if args.json {
        let report = serde_json::json!({
            "folder": args.folder.to_string_lossy(),
            "series": reports,
            "ignored": scan.ignored,
        });
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!("{}: {} image series, {} other file(s)", args.folder.display(), scan.series.len(), scan.ignored.len())?;
    for ((series, r), (checks, syntaxes)) in scan.series.iter().zip(&reports).zip(&checked) {
        outln!("\n{}. {}", r["number"], series.label())?;
        let first = &series.slices[0];
        outln!("   {} x {} pixels, pixel spacing {:?} mm", first.columns, first.rows, first.pixel_spacing)?;
        outln!("   orientation {:?} ({})", first.orientation, r["plane"].as_str().unwrap_or_default())?;
        outln!("   transfer syntax: {}", syntaxes.iter().cloned().collect::<Vec<_>>().join(", "))?;
        match checks {
            Ok(g) => {
                outln!(
                    "   volume {} x {} x {}, spacing {:.4} x {:.4} x {:.4} mm",
                    g.dims[0],
                    g.dims[1],
                    g.dims[2],
                    g.spacing[0],
                    g.spacing[1],
                    g.spacing[2]
                )?;
                outln!("   ready to segment")?;
            }
            Err(problems) => {
                outln!("   cannot be segmented:")?;
                for p in problems {
                    outln!("   - {p}")?;
                }
            }
        }
    }
    if !scan.ignored.is_empty() {
        outln!("\nignored:")?;
        for i in scan.ignored.iter().take(10) {
            outln!("   {}: {}", i.path.display(), i.reason)?;
        }
        if scan.ignored.len() > 10 {
            outln!("   ... and {} more", scan.ignored.len() - 10)?;
        }
    }
    Ok(())
}
