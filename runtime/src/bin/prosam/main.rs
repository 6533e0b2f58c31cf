//! `prosam`: the device CLI.

/// `println!` that returns the write's error instead of panicking, so that a closed pipe
/// (`prosam eval ... | head`) ends the command quietly (see `main`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod bench;
mod convert;
mod demo;
mod dicom_info;
mod eval;
mod forward;
mod info;
mod phantom;
mod quantize;
mod segment;

use clap::{Parser, Subcommand};
use prosam_runtime::device::DeviceChoice;

#[derive(Parser)]
#[command(name = "prosam", version, about = "On-device abdominal organ segmentation for CT")]
struct Cli {
    /// Worker threads for the compute kernels (default: the machine's physical cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// No progress or timing output on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Compute device for segment, bench and forward: cpu, cuda[:N] or metal[:N] (the GPUs need
    /// a build with `--features cuda` or `--features metal`).
    #[arg(long, global = true, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segment the abdominal organs of a CT (NIfTI or a DICOM series in; NIfTI label map or
    /// DICOM-SEG out).
    Segment(segment::Args),
    /// List the DICOM series in a folder and what would stop each from being segmented.
    DicomInfo(dicom_info::Args),
    /// Convert a MONAI SwinUNETR checkpoint (student) or an AutoProSAM checkpoint (teacher) into a prosam model file.
    Convert(convert::Args),
    /// Re-encode a model file in f16 or int8.
    Quantize(quantize::Args),
    /// Time one window of the network on this device.
    Bench(bench::Args),
    /// Print a model file's metadata, parameter count, size and precision.
    Info(info::Args),
    /// Run the raw network on a float32 array (1, C, D, H, W) from .npy and write the logits as .npy.
    Forward(forward::Args),
    /// Make a synthetic phantom, segment it with the built-in model and score the result.
    Demo(demo::Args),
    /// Per-organ Dice, normalized surface Dice and HD95 of a label map against the truth.
    Eval(eval::Args),
    /// Write synthetic abdominal CT phantoms with their organ labels (Decathlon layout).
    Phantom(phantom::Args),
}

/// Sizes the thread pools before any of them starts: rayon's (Candle's matrix products) and
/// Candle's own pool for element-wise and quantized kernels, which read these variables.
fn set_threads(threads: usize) -> anyhow::Result<()> {
    prosam_runtime::resources::check_threads(threads).map_err(|e| anyhow::anyhow!("--threads: {e}"))?;
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    prosam_runtime::resources::retain_freed_memory();
    let result = (|| {
        if let Some(n) = cli.threads {
            set_threads(n)?;
        }
        install_interrupt_cleanup();
        let device: DeviceChoice = cli.device.parse()?;
        match cli.command {
            Command::Segment(args) => segment::run(args, device, cli.quiet),
            Command::Convert(args) => convert::run(args, cli.quiet),
            Command::Info(args) => info::run(args),
            Command::DicomInfo(args) => dicom_info::run(args),
            Command::Quantize(args) => quantize::run(args, cli.quiet),
            Command::Bench(args) => bench::run(args, device),
            Command::Forward(args) => forward::run(args, device, cli.quiet),
            Command::Eval(args) => eval::run(args),
            Command::Demo(args) => demo::run(args, device, cli.quiet),
            Command::Phantom(args) => phantom::run(args, cli.quiet),
        }
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of stdout has gone (`| head`): nothing left to tell it.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", prosam_runtime::error::chain_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// On Ctrl-C (or SIGTERM), removes the temporary files being written and exits with 130, so an
/// interrupted run leaves neither a partial output nor a temporary file.
fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        prosam_models::temp_file::remove_in_flight();
        eprintln!("interrupted");
        std::process::exit(130);
    });
}

/// A progress bar on stderr counting `unit`, hidden with `--quiet`.
pub(crate) fn progress_bar(len: u64, unit: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("[{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}} {{msg}}"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A model loaded for inference on a device, with the load figures the raw-network commands report.
pub(crate) struct LoadedModel {
    pub file: prosam_models::format::ModelFile,
    pub net: prosam_models::network::Network,
    pub device: candle_core::Device,
    /// What the network computes in there ([`prosam_runtime::device::compute_dtype`]).
    pub dtype: candle_core::DType,
    /// Opening, checksum verification and network construction, in seconds.
    pub load_s: f64,
    /// Resident memory right after loading.
    pub resident_mib: Option<f64>,
}

pub(crate) fn load_model(path: &std::path::Path, device: DeviceChoice) -> anyhow::Result<LoadedModel> {
    let device = device.open()?;
    let t0 = std::time::Instant::now();
    let file = prosam_models::format::ModelFile::open(path)?;
    let dtype = prosam_runtime::device::compute_dtype(&device, file.metadata().precision);
    let net = file.network(dtype, &device)?;
    let load_s = t0.elapsed().as_secs_f64();
    Ok(LoadedModel { file, net, device, dtype, load_s, resident_mib: prosam_runtime::resources::resident_mib() })
}

/// Checks an output before any work: it names none of the inputs (an input is never
/// overwritten), and it can be written ([`prosam_models::temp_file::check_writable`]: a regular
/// file or nothing yet, in a folder that exists, with room for its temporary name).
pub(crate) fn check_output_path(output: &std::path::Path, inputs: &[&std::path::Path]) -> anyhow::Result<()> {
    Ok(prosam_models::temp_file::check_output(output, inputs)?)
}
