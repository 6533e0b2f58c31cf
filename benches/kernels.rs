//! Latency of the CPU kernels that dominate a 96^3 fs 12 window: the fused window attention at the
//! first Swin stage's shape (343 windows of 7^3 tokens, 3 heads of 4, plain and shifted) and the
//! 3^3 convolutions of decoder 1 (24 -> 12 and 12 -> 12 channels at 96^3; the first also with an
//! int8 weight; both also fused with their norms, in f32 and in 16-bit integers) and decoder 2 (at
//! 48^3).
//!
//! `cargo bench --bench kernels`; threads follow `RAYON_NUM_THREADS` (default: physical cores).

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use prosam_models::ops::quantized::{Q8Matrix, Weight};
use prosam_models::ops::{
    ConvArithmetic, PendingNorm, compute_shift_regions, conv3d, conv3d_weight, conv3d_with_moments,
    window_attention_qkv,
};

fn bench_kernels(c: &mut Criterion) {
    prosam_runtime::resources::retain_freed_memory();
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("kernels");
    group.sample_size(10);

    let (windows, n, heads, channels) = (343, 343, 3, 12);
    let qkv = Tensor::randn(0f32, 1.0, (windows, n, 3 * channels), &dev).unwrap();
    let bias = Tensor::randn(0f32, 1.0, (heads, n, n), &dev).unwrap();
    let regions = compute_shift_regions([49, 49, 49], [7, 7, 7], [3, 3, 3], &dev).unwrap();
    let scale = 0.5;
    group.bench_function("attention_stage1", |b| {
        b.iter(|| window_attention_qkv(&qkv, heads, scale, &bias, None).unwrap())
    });
    group.bench_function("attention_stage1_shifted", |b| {
        b.iter(|| window_attention_qkv(&qkv, heads, scale, &bias, Some(&regions)).unwrap())
    });

    let x24 = Tensor::randn(0f32, 1.0, (1, 24, 96, 96, 96), &dev).unwrap();
    let x12 = Tensor::randn(0f32, 1.0, (1, 12, 96, 96, 96), &dev).unwrap();
    let w24 = Tensor::randn(0f32, 0.1, (12, 24, 3, 3, 3), &dev).unwrap();
    let w12 = Tensor::randn(0f32, 0.1, (12, 12, 3, 3, 3), &dev).unwrap();
    group.bench_function("conv3d_96_24to12", |b| b.iter(|| conv3d(&x24, &w24, None, 1, 1).unwrap()));
    group.bench_function("conv3d_96_12to12", |b| b.iter(|| conv3d(&x12, &w12, None, 1, 1).unwrap()));
    // The same convolution with an int8 weight: the VNNI kernel where the CPU has it.
    let (q24, _) = Q8Matrix::quantize(&w24.reshape((12, ())).unwrap()).unwrap();
    let q24 = Weight::Q8(std::sync::Arc::new(q24));
    group.bench_function("conv3d_96_24to12_int8", |b| b.iter(|| conv3d_weight(&x24, &q24, [3; 3], None, 1).unwrap()));
    // A UnetResBlock's fused convolutions (moments out; the second normalises its input as it
    // reads it) in f32 and in the 16-bit integers of int8 models.
    let moments12 = vec![(0.0, 1.0); 12];
    for arithmetic in [ConvArithmetic::Float, ConvArithmetic::Int16] {
        let name = if arithmetic == ConvArithmetic::Float { "f32" } else { "int16" };
        let (d24, d12) = (Weight::Dense(w24.clone()), Weight::Dense(w12.clone()));
        group.bench_function(format!("conv3d_96_24to12_fused_{name}"), |b| {
            b.iter(|| conv3d_with_moments(&x24, &d24, [3; 3], 1, None, arithmetic).unwrap())
        });
        group.bench_function(format!("conv3d_96_12to12_fused_{name}"), |b| {
            b.iter(|| {
                let norm = PendingNorm { moments: &moments12, eps: 1e-5, slope: 0.01 };
                conv3d_with_moments(&x12, &d12, [3; 3], 1, Some(norm), arithmetic).unwrap()
            })
        });
    }
    let x48 = Tensor::randn(0f32, 1.0, (1, 24, 48, 48, 48), &dev).unwrap();
    group.bench_function("conv3d_48_24to12", |b| b.iter(|| conv3d(&x48, &w24, None, 1, 1).unwrap()));
    group.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
