//! The whole SwinUNETR against the naive f64 reference network (`reference/`), for configurations
//! the MONAI fixtures do not cover, and its backward pass against finite differences.

mod reference;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use prosam_models::swin_unetr::{Config, Downsample, SwinUnetr};
use reference::{Arr, RefConfig, Rng};

/// Random weights for every parameter, scaled so that activations stay near unit size.
fn random_weights(cfg: &Config, seed: u64) -> HashMap<String, Arr> {
    let mut rng = Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(key, shape)| {
            let arr = if key.ends_with("norm1.weight") || key.ends_with("norm2.weight") || key.ends_with("norm.weight")
            {
                let mut a = rng.arr(&shape, 0.2);
                a.data.iter_mut().for_each(|v| *v += 1.0);
                a
            } else if key.ends_with("bias") {
                rng.arr(&shape, 0.2)
            } else if key.ends_with("relative_position_bias_table") {
                rng.arr(&shape, 0.5)
            } else {
                let fan_in: usize = if key.contains("transp_conv") { shape[0] } else { shape[1..].iter().product() };
                rng.arr(&shape, (3.0 / fan_in as f64).sqrt())
            };
            (key, arr)
        })
        .collect()
}

fn ref_config(cfg: &Config) -> RefConfig {
    RefConfig {
        in_channels: cfg.in_channels,
        out_channels: cfg.out_channels,
        feature_size: cfg.feature_size,
        depths: cfg.depths,
        heads: cfg.num_heads,
        window: cfg.window_size,
        use_v2: cfg.use_v2,
        merging_v2: cfg.downsample == Downsample::MergingV2,
        normalize: cfg.normalize,
    }
}

fn to_tensor(a: &Arr, dtype: DType) -> Tensor {
    Tensor::from_vec(a.data.clone(), a.shape.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn build(cfg: &Config, weights: &HashMap<String, Arr>, dtype: DType) -> SwinUnetr {
    let tensors = weights.iter().map(|(k, a)| (k.clone(), to_tensor(a, dtype))).collect();
    SwinUnetr::new(cfg, VarBuilder::from_tensors(tensors, dtype, &Device::Cpu)).unwrap()
}

/// The network in f64 (to 1e-9) and in f32 (to 1e-4, argmax agreeing) against the reference.
fn check_network(cfg: &Config, input_shape: &[usize], seed: u64) {
    let weights = random_weights(cfg, seed);
    let x = Rng::new(seed + 1).arr(input_shape, 1.0);
    let expected = reference::swin_unetr(&ref_config(cfg), &weights, &x);
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        let y = build(cfg, &weights, dtype).forward_checked(&to_tensor(&x, dtype)).unwrap();
        assert_eq!(y.dims(), expected.shape.as_slice());
        let got = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let err = expected.max_abs_diff(&got);
        eprintln!(
            "{dtype:?}: max |dlogit| {err:e}, max |logit| {}",
            expected.data.iter().fold(0f64, |m, v| m.max(v.abs()))
        );
        assert!(err <= tol, "{dtype:?}: max |dlogit| {err:e} > {tol:e}");
    }
}

#[test]
fn fs24_small_student_non_cubic() {
    check_network(&Config::small(), &[1, 1, 64, 32, 64], 100);
}

#[test]
fn fs12_v2_mergingv2_unnormalized_window5_odd_depths_batch2() {
    // Window 5 clamps some axes but not others at stage 3 (8x4x8: window 5x4x5, shift 2x0x2),
    // and all at stage 4; batch 2 checks that windows and norms stay per sample. The bottleneck
    // has 4 voxels: on 2, instance norm amplifies f32 rounding past MONAI's 1e-4 whatever the
    // implementation (its output is nearly sign(a - b)).
    let cfg = Config {
        in_channels: 2,
        out_channels: 3,
        feature_size: 12,
        depths: [2, 1, 3, 2],
        num_heads: [2, 4, 6, 8],
        window_size: 5,
        use_v2: true,
        downsample: Downsample::MergingV2,
        normalize: false,
    };
    check_network(&cfg, &[2, 2, 64, 32, 64], 200);
}

#[test]
fn backward_reaches_every_parameter_and_matches_finite_differences() {
    let cfg = Config { use_v2: true, out_channels: 3, ..Config::tiny() };
    let weights = random_weights(&cfg, 300);
    let vars: HashMap<String, Var> =
        weights.iter().map(|(k, a)| (k.clone(), Var::from_tensor(&to_tensor(a, DType::F64)).unwrap())).collect();
    let tensors = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let net = SwinUnetr::new(&cfg, VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu)).unwrap();
    let x = to_tensor(&Rng::new(301).arr(&[1, 1, 64, 32, 32], 1.0), DType::F64);
    let r = to_tensor(&Rng::new(302).arr(&[1, 3, 64, 32, 32], 1.0), DType::F64);
    let loss = |net: &SwinUnetr| (net.forward(&x).unwrap() * &r).unwrap().sum_all().unwrap();
    let grads = loss(&net).backward().unwrap();
    for (key, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reaches {key}"));
        let nonzero = g.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(nonzero > 0.0, "the gradient of {key} is all zero");
    }
    // Finite differences on entries of parameters from every kind of layer (index 13 of a 3x3x3
    // kernel is its centre tap, which sees data even on the one-voxel-thick bottleneck).
    let probes = [
        ("swinViT.patch_embed.proj.weight", 5),
        ("swinViT.layers1.0.blocks.1.attn.relative_position_bias_table", 1000),
        ("swinViT.layers2.0.blocks.0.attn.qkv.weight", 77),
        ("swinViT.layers3.0.downsample.norm.weight", 9),
        ("swinViT.layers4.0.blocks.1.mlp.linear1.bias", 3),
        ("swinViT.layers1c.0.layer.conv2.conv.weight", 40),
        ("encoder10.layer.conv1.conv.weight", 13),
        ("decoder1.transp_conv.conv.weight", 17),
        ("decoder2.conv_block.conv3.conv.weight", 2),
        ("out.conv.conv.bias", 1),
    ];
    // The 2-voxel bottleneck's instance norms make the loss sharply curved along encoder weights,
    // and leaky ReLU kinks make it non-smooth: central differences at h = 1e-6 stay within a few
    // 1e-4 of the true slope there (1e-7 elsewhere), while a dropped or wrong gradient is off by O(1).
    let h = 1e-6;
    for (key, index) in probes {
        let analytic =
            grads.get(vars[key].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[index];
        let eval = |delta: f64| {
            let tensors = weights
                .iter()
                .map(|(k, a)| {
                    let mut a = a.clone();
                    if k == key {
                        a.data[index] += delta;
                    }
                    (k.clone(), to_tensor(&a, DType::F64))
                })
                .collect();
            let net = SwinUnetr::new(&cfg, VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu)).unwrap();
            loss(&net).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(analytic != 0.0, "{key}[{index}]: zero gradient probed");
        let err = (fd - analytic).abs() / fd.abs().max(1.0);
        assert!(err < 5e-3, "{key}[{index}]: backward {analytic} vs finite difference {fd} (rel err {err:e})");
    }
}

/// The network in f16 on the CPU: the fused CPU kernels take f32 and f64 only, so this runs every
/// op's portable tensor-op formulation in half precision, the path CUDA and Metal take for f16 and
/// int8 model files.
#[test]
fn half_precision_runs_the_portable_path_close_to_the_reference() {
    let cfg = Config::tiny();
    let weights = random_weights(&cfg, 400);
    let x = Rng::new(401).arr(&[1, 1, 64, 32, 64], 1.0);
    let expected = reference::swin_unetr(&ref_config(&cfg), &weights, &x);
    let y = build(&cfg, &weights, DType::F16).forward_checked(&to_tensor(&x, DType::F16)).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    let got = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let err = expected.max_abs_diff(&got);
    let scale = expected.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    let classes = cfg.out_channels;
    let voxels = got.len() / classes;
    let argmax =
        |t: &[f64], v: usize| (0..classes).max_by(|&i, &j| t[i * voxels + v].total_cmp(&t[j * voxels + v])).unwrap();
    let agree = (0..voxels).filter(|&v| argmax(&got, v) == argmax(&expected.data, v)).count() as f64 / voxels as f64;
    eprintln!("F16: max |dlogit| {err:e} of max |logit| {scale}, argmax agreement {:.3}%", agree * 100.0);
    assert!(err <= 2e-2 * scale.max(1.0), "F16: max |dlogit| {err:e}");
    assert!(agree >= 0.98, "F16: argmax agrees on {:.3}%", agree * 100.0);
}
