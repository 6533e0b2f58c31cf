//! Writes a SwinUNETR student with random weights: latency does not depend on the weights, so
//! benchmarks use it where no trained file of that size exists (fs 24, say).
//!
//! `cargo run --release --example random_student -- FEATURE_SIZE OUT.safetensors`

use candle_core::{Device, Tensor};
use prosam_models::format::Metadata;
use prosam_models::swin_unetr::Config;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [fs, out] = args.as_slice() else {
        anyhow::bail!("usage: random_student FEATURE_SIZE OUT.safetensors");
    };
    let cfg = Config { feature_size: fs.parse()?, ..Config::tiny() };
    cfg.validate()?;
    let tensors = cfg
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| Ok((name, Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    prosam_models::format::save(std::path::Path::new(out), Metadata::btcv(&format!("random_fs{fs}"), cfg), &tensors)?;
    Ok(())
}
