//! `prosam forward`: the raw network on a float32 array, the way ML engineers check a port.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Module, Tensor};
use prosam_runtime::device::DeviceChoice;
use prosam_runtime::{npy, resources};

#[derive(clap::Args)]
pub struct Args {
    /// The prosam model file.
    #[arg(short, long, value_name = "MODEL")]
    model: PathBuf,
    /// Input array (1, C, D, H, W), float32 (other numeric dtypes are converted).
    #[arg(short, long, value_name = "X.npy")]
    input: PathBuf,
    /// Output logits (1, K, D, H, W), float32.
    #[arg(short, long, value_name = "Y.npy")]
    output: PathBuf,
}

pub fn run(args: Args, device: DeviceChoice, quiet: bool) -> anyhow::Result<()> {
    super::check_output_path(&args.output, &[&args.input, &args.model])?;
    let super::LoadedModel { net, device, dtype, load_s, resident_mib: resident, .. } =
        super::load_model(&args.model, device)?;

    let x = npy::read(&args.input)?;
    net.check_input(&x.shape).map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
    let x = Tensor::from_vec(x.data, x.shape, &device)?.to_dtype(dtype)?;
    let t1 = Instant::now();
    let y = net.forward(&x)?.to_dtype(DType::F32)?;
    let forward_s = t1.elapsed().as_secs_f64();
    let shape = y.dims().to_vec();
    npy::write_f32(&args.output, &shape, &y.flatten_all()?.to_vec1::<f32>()?)?;
    if !quiet {
        let mib = |v: Option<f64>| v.map_or("?".into(), |m| format!("{m:.0} MiB"));
        eprintln!(
            "{} -> {} {:?}: load {load_s:.3} s (resident {}), forward {forward_s:.3} s, {} threads, peak RSS {}",
            args.input.display(),
            args.output.display(),
            shape,
            mib(resident),
            candle_core::utils::get_num_threads(),
            mib(resources::peak_rss_mib())
        );
    }
    Ok(())
}
