//! `prosam quantize`: a model file re-encoded in f16 or int8.

use std::path::PathBuf;

use candle_core::Device;
use prosam_models::format::quantize::quantize;
use prosam_models::format::{ModelFile, Precision};

#[derive(clap::Args)]
pub struct Args {
    /// The f32 or f16 model file to convert.
    #[arg(short, long, value_name = "MODEL")]
    model: PathBuf,
    /// Target precision: f16 (every weight in half precision) or int8 (linear layers and 3x3x3
    /// convolutions as Q8_0 blocks, the rest in f16).
    #[arg(long, value_name = "f16|int8")]
    to: String,
    /// The model file to write.
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,
}

pub fn run(args: Args, quiet: bool) -> anyhow::Result<()> {
    super::check_output_path(&args.output, &[&args.model])?;
    let to: Precision = args.to.parse().map_err(anyhow::Error::msg)?;
    let file = ModelFile::open(&args.model)?;
    let mut tensors: Vec<_> = file.tensors(&Device::Cpu)?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (metadata, tensors) =
        quantize(file.metadata(), tensors, to).map_err(|e| anyhow::anyhow!("{}: {e}", args.model.display()))?;
    let written = prosam_models::format::save(&args.output, metadata, &tensors)?;
    if !quiet {
        let out_size = std::fs::metadata(&args.output)?.len() as f64;
        let in_size = file.file_size() as f64;
        eprintln!(
            "{} ({}, {:.1} MiB) -> {} ({}, {:.1} MiB, {:.0}% of the input; {} int8 tensors)",
            args.model.display(),
            file.metadata().precision,
            in_size / 1048576.0,
            args.output.display(),
            written.precision,
            out_size / 1048576.0,
            100.0 * out_size / in_size,
            written.quantized.len()
        );
    }
    Ok(())
}
