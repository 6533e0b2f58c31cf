//! `prosam phantom`: synthetic abdominal CTs with their organ labels, in the Medical Segmentation
//! Decathlon layout that `prosam-distill` reads.

use std::path::PathBuf;

use prosam_runtime::phantom::{PhantomOptions, write_dataset};

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
    /// In-plane voxel size range in mm.
    #[arg(long, default_value = "1.0,1.6", value_name = "MIN,MAX")]
    in_plane: String,
    /// Slice spacing range in mm.
    #[arg(long, default_value = "2.0,3.5", value_name = "MIN,MAX")]
    slice: String,
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
    let options = PhantomOptions {
        in_plane_mm: range(&args.in_plane, "--in-plane")?,
        slice_mm: range(&args.slice, "--slice")?,
        random_orientation: !args.ras,
        ..PhantomOptions::default()
    };
    let seeds: Vec<u64> = (0..args.cases as u64).map(|n| args.seed + n).collect();
    let bar = crate::progress_bar(args.cases as u64, "cases", quiet);
    let t0 = std::time::Instant::now();
    let written = write_dataset(&args.out, &seeds, args.validation, &options, &mut |c| {
        bar.inc(1);
        bar.set_message(format!("seed {} ({}, {:?} voxels)", c.seed, c.phase, c.dims));
    })?;
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
