//! The paper's ViT-B teacher on the CPU: builds it from a ViT-B-shaped SAM checkpoint (random
//! weights, written as safetensors with SAM's `image_encoder.*` names), then times one forward pass
//! or one training step on a random crop and reports the peak memory.
//!
//! `cargo run --release -p prosam-distill --example vit_b_step -- forward|stage1|stage2 [CROP]`
//! (one measurement per process, so that the peak is that of the measurement).

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use prosam_distill::teacher::{Init, TeacherTrainer, TrainOptions, initial_weights, random_weights};
use prosam_models::autoprosam::Config;
use prosam_models::format::Metadata;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("forward");
    let crop: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let cfg = Config::vit_b().with_crop(crop);
    cfg.validate()?;
    let rss = || prosam_runtime::resources::peak_rss_mib().unwrap_or(f64::NAN);

    // A SAM checkpoint of ViT-B's shapes: the SAM parameters of a randomly initialised teacher.
    let dir = std::env::temp_dir().join("prosam_vit_b_sam");
    std::fs::create_dir_all(&dir)?;
    let sam_path = dir.join("sam_vit_b_random.safetensors");
    if !sam_path.is_file() {
        let mut sam: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        for (name, t) in random_weights(&cfg, 7)? {
            if Config::loads_from_sam(&name) {
                let t = if name.ends_with("weight") || name.ends_with("embed") { (t + 0.01)? } else { t };
                sam.insert(format!("image_encoder.{}", name.trim_start_matches("encoder.")), t);
            }
        }
        candle_core::safetensors::save(&sam, &sam_path)?;
    }
    let t0 = Instant::now();
    let weights = initial_weights(&cfg, &Init::Sam(sam_path.clone(), 1))?;
    println!(
        "built ViT-B from {} in {:.1} s ({} parameters)",
        sam_path.display(),
        t0.elapsed().as_secs_f64(),
        cfg.parameter_count()
    );

    let n = crop * crop * crop;
    let image: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let labels: Vec<u8> = (0..n).map(|i| ((i / crop) % 14) as u8).collect();
    match what {
        "forward" => {
            let vb = candle_nn::VarBuilder::from_tensors(
                weights.into_iter().collect(),
                candle_core::DType::F32,
                &Device::Cpu,
            );
            let net = prosam_models::autoprosam::AutoProSam::new(&cfg, vb)?;
            let x = Tensor::from_vec(image, (1, 1, crop, crop, crop), &Device::Cpu)?;
            let t = Instant::now();
            let y = net.forward(&x)?;
            println!(
                "forward {crop}^3: {:.1} s ({:.0} GMAC, {:.1} GMAC/s), logits {:?}, peak RSS {:.0} MiB",
                t.elapsed().as_secs_f64(),
                cfg.macs() as f64 / 1e9,
                cfg.macs() as f64 / 1e9 / t.elapsed().as_secs_f64(),
                y.dims(),
                rss()
            );
        }
        "stage1" | "stage2" => {
            let stage = if what == "stage1" { 1 } else { 2 };
            let options = TrainOptions { stage, warmup_epochs: 0, ..Default::default() };
            let mut trainer =
                TeacherTrainer::new(Metadata::teacher("vit_b", cfg.clone()), weights, options, &Device::Cpu)?;
            let (trainable, total) = trainer.parameter_counts();
            let t = Instant::now();
            let loss = trainer.step(&image, &labels, [crop; 3])?;
            println!(
                "stage-{stage} step {crop}^3: {:.1} s, loss {loss:.4}, {trainable} of {total} parameters trained, peak RSS {:.0} MiB",
                t.elapsed().as_secs_f64(),
                rss()
            );
        }
        other => anyhow::bail!("unknown measurement `{other}` (forward, stage1 or stage2)"),
    }
    Ok(())
}
