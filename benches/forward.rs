//! Latency of one 96^3 window through the SwinUNETR students (fs 12 and fs 24; f32, f16 and int8
//! files; CPU), and of loading each model file. Weights are random: latency does not depend on their values.
//!
//! `cargo bench --bench forward`; threads follow `RAYON_NUM_THREADS` (default: physical cores).
//! `benches/compare_onnxruntime.sh` runs this next to ONNX Runtime on the same machine.

#[path = "../runtime/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use prosam_models::format::quantize::quantize;
use prosam_models::format::{Metadata, ModelFile, Precision};
use prosam_models::swin_unetr::{Config, SwinUnetr};

fn metadata(cfg: &Config) -> Metadata {
    Metadata::btcv(&format!("random_fs{}", cfg.feature_size), cfg.clone())
}

fn bench_students(c: &mut Criterion) {
    // As the CLI does: freed tensors stay in the heap for the next pass.
    prosam_runtime::resources::retain_freed_memory();
    let dir = std::env::temp_dir().join(format!("prosam-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = Tensor::rand(0f32, 1.0, (1, 1, 96, 96, 96), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("swin_unetr_96");
    group.sample_size(10);
    for cfg in [Config::tiny(), Config::small()] {
        let fs = cfg.feature_size;
        let f32_path = dir.join(format!("fs{fs}.safetensors"));
        let f32_meta =
            prosam_models::format::save(&f32_path, metadata(&cfg), &common::random_weights(&cfg, 0.02)).unwrap();
        for precision in [Precision::F32, Precision::F16, Precision::Int8] {
            let path = dir.join(format!("fs{fs}_{precision}.safetensors"));
            if precision == Precision::F32 {
                std::fs::copy(&f32_path, &path).unwrap();
            } else {
                let tensors: Vec<_> =
                    ModelFile::open(&f32_path).unwrap().tensors(&Device::Cpu).unwrap().into_iter().collect();
                let (meta, tensors) = quantize(&f32_meta, tensors, precision).unwrap();
                prosam_models::format::save(&path, meta, &tensors).unwrap();
            }
            let load = || ModelFile::open(&path).unwrap().swin_unetr(DType::F32, &Device::Cpu).unwrap();
            group.bench_function(format!("load_fs{fs}_{precision}"), |b| b.iter(load));
            let net: SwinUnetr = load();
            eprintln!(
                "fs {fs} {precision}: {:.1} GMAC per 96^3 window, {} parameters, {:.1} MiB file",
                cfg.macs([96, 96, 96]) as f64 / 1e9,
                cfg.parameter_count(),
                std::fs::metadata(&path).unwrap().len() as f64 / 1048576.0
            );
            group.bench_function(format!("forward_fs{fs}_{precision}"), |b| b.iter(|| net.forward(&x).unwrap()));
        }
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_students);
criterion_main!(benches);
