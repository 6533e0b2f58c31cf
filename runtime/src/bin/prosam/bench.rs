//! `prosam bench`: latency of one window on this device, the figure device engineers compare.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Module, Tensor};
use prosam_models::format::Architecture;
use prosam_runtime::device::DeviceChoice;
use prosam_runtime::resources;

#[derive(clap::Args)]
pub struct Args {
    /// The prosam model file (any precision).
    #[arg(short, long, value_name = "MODEL")]
    model: PathBuf,
    /// Window size: `S` for S^3 or `D,H,W`; each a multiple of 32.
    #[arg(long, default_value = "96")]
    size: String,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed runs first (allocations, caches).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also time each part of the network (Swin stages, encoders, decoders) and print the medians.
    #[arg(long)]
    profile: bool,
    /// Print one JSON object (the fields are documented in the README).
    #[arg(long)]
    json: bool,
}

/// The median of a non-empty list (sorted in place).
fn median_of(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    if n % 2 == 1 { times[n / 2] } else { (times[n / 2 - 1] + times[n / 2]) / 2.0 }
}

fn parse_size(text: &str) -> anyhow::Result<[usize; 3]> {
    let parts: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--size: `{s}` is not a size")))
        .collect::<anyhow::Result<_>>()?;
    match parts.as_slice() {
        [s] => Ok([*s; 3]),
        [d, h, w] => Ok([*d, *h, *w]),
        _ => anyhow::bail!("--size takes S or D,H,W"),
    }
}

pub fn run(args: Args, device_choice: DeviceChoice) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let size = parse_size(&args.size)?;
    let super::LoadedModel { file, net, device, dtype, load_s, resident_mib: resident } =
        super::load_model(&args.model, device_choice)?;
    let meta = file.metadata().clone();
    let arch = &meta.architecture;
    let shape = [1, arch.in_channels(), size[0], size[1], size[2]];
    arch.check_input(&shape).map_err(|e| anyhow::anyhow!("--size {}: {e}", args.size))?;
    let x = Tensor::rand(0f32, 1.0, &shape, &device)?.to_dtype(dtype)?;
    // GPUs queue work asynchronously: a run (or a part) ends when the device has finished it.
    // Each run returns its parts' durations in order; without --profile there are none.
    let run_once = || -> anyhow::Result<Vec<(&'static str, f64)>> {
        let mut parts = Vec::new();
        if args.profile {
            let mut last = Instant::now();
            let mut sync_error = None;
            net.forward_marked(&x, &mut |part| {
                if let Err(e) = device.synchronize() {
                    sync_error.get_or_insert(e);
                }
                parts.push((part, last.elapsed().as_secs_f64()));
                last = Instant::now();
            })?;
            if let Some(e) = sync_error {
                return Err(e.into());
            }
        } else {
            net.forward(&x)?;
        }
        device.synchronize()?;
        Ok(parts)
    };
    for _ in 0..args.warmup {
        run_once()?;
    }
    let mut times = Vec::with_capacity(args.runs);
    let mut part_times: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let parts = run_once()?;
        times.push(t.elapsed().as_secs_f64());
        for (i, (name, seconds)) in parts.into_iter().enumerate() {
            match part_times.get_mut(i) {
                Some((_, list)) => list.push(seconds),
                None => part_times.push((name, vec![seconds])),
            }
        }
    }
    let runs_s = times.clone();
    let median = median_of(&mut times);
    let profile: Vec<(&str, f64)> = part_times.iter_mut().map(|(name, list)| (*name, median_of(list))).collect();
    let gmac = match arch {
        Architecture::SwinUnetr(cfg) => cfg.macs(size),
        Architecture::AutoProSam(cfg) => cfg.macs(),
    } as f64
        / 1e9;
    let report = serde_json::json!({
        "model": meta.name,
        "precision": meta.precision,
        "device": device_choice.to_string(),
        "compute_dtype": format!("{dtype:?}").to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
        "size": size,
        "runs": args.runs,
        "warmup": args.warmup,
        "median_s": median,
        "min_s": times[0],
        "max_s": times[times.len() - 1],
        "times_s": runs_s,
        "gmac": gmac,
        "gmac_per_s": gmac / median,
        "load_s": load_s,
        "resident_mib": resident,
        "peak_rss_mib": resources::peak_rss_mib(),
        "profile_median_s": args.profile.then(|| profile.iter().map(|(n, t)| (n.to_string(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>()),
        "prosam_version": env!("CARGO_PKG_VERSION"),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "{} ({}, {}, {} threads, {}x{}x{}): median {:.3} s (min {:.3}, max {:.3}, {} runs), {:.1} GMAC/s; load {:.3} s, resident {:.0} MiB, peak RSS {:.0} MiB",
            meta.name,
            meta.precision,
            device_choice,
            report["threads"],
            size[0],
            size[1],
            size[2],
            median,
            times[0],
            times[times.len() - 1],
            args.runs,
            gmac / median,
            load_s,
            resident.unwrap_or(f64::NAN),
            resources::peak_rss_mib().unwrap_or(f64::NAN)
        )?;
        if args.profile {
            let total: f64 = profile.iter().map(|(_, t)| t).sum();
            outln!("{:<12} {:>9} {:>6}", "part", "median s", "share")?;
            for (name, t) in &profile {
                outln!("{name:<12} {t:>9.3} {:>5.1}%", 100.0 * t / total)?;
            }
        }
    }
    Ok(())
}
