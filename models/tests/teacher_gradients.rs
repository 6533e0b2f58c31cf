//! The teacher's trainable parts (adapters, depth attention, APG, decoder, the new embeddings and
//! necks) back-propagate correctly: f64 gradients against central finite differences, on a small
//! configuration with random weights, and every stage-1 parameter receives a gradient.

mod reference;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use prosam_models::autoprosam::{AutoProSam, Config};
use reference::Rng;

/// Every parameter as an f64 variable, scaled by fan-in so activations stay near unit size.
fn random_vars(cfg: &Config, seed: u64) -> HashMap<String, Var> {
    let mut rng = Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let mut data = rng.vec(n, (3.0 / fan_in as f64).sqrt());
            if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.ends_with("attn.lr") {
                data.iter_mut().for_each(|v| *v = 1.0 + 0.3 * *v);
            } else if name.contains("rel_pos") || name.ends_with("bias") || name.contains("embed") {
                data = rng.vec(n, 0.5);
            }
            let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
            (name, Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn builder(vars: &HashMap<String, Var>) -> VarBuilder<'static> {
    let tensors = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu)
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    Tensor::from_vec(rng.vec(shape.iter().product(), 1.0), shape, &Device::Cpu).unwrap()
}

/// `sum(f() * r)` for a fixed random `r`: its gradient with respect to `params` against central
/// differences on a few entries of each (the largest-gradient entry and random ones), to relative
/// error `tol`.
fn check_to(tol: f64, name: &str, vars: &HashMap<String, Var>, params: &[&str], f: impl Fn() -> Tensor) {
    let y = f();
    let r = random(y.dims(), 99);
    let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut rng = Rng::new(7);
    for &p in params {
        let var = &vars[p];
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: `{p}` received no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(g.iter().any(|v| *v != 0.0), "{name}: `{p}` has an all-zero gradient");
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let largest = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let mut picks = vec![largest];
        picks.extend((0..3).map(|_| rng.next_u64() as usize % g.len()));
        for &i in &picks {
            let at = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                loss(&f())
            };
            let h = 1e-5;
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let err = (fd - g[i]).abs() / fd.abs().max(1.0);
            assert!(err < tol, "{name}: d/d {p}[{i}]: backward {} vs finite difference {fd} (rel err {err:e})", g[i]);
        }
        eprintln!("{name}: `{p}` ok ({} entries checked)", picks.len());
    }
}

fn check(name: &str, vars: &HashMap<String, Var>, params: &[&str], f: impl Fn() -> Tensor) {
    check_to(1e-6, name, vars, params, f)
}

#[test]
fn shifted_block_adapter_and_depth_attention() {
    let cfg = Config::micro();
    let vars = random_vars(&cfg, 1);
    let net = AutoProSam::new(&cfg, builder(&vars)).unwrap();
    let block = &net.encoder().blocks()[0];
    assert!(block.shift_mask().is_some(), "block 0 shifts");
    let x = random(&[1, 4, 4, 4, 8], 2);
    let params = [
        "encoder.blocks.0.adapter.linear1.weight",
        "encoder.blocks.0.adapter.conv.weight",
        "encoder.blocks.0.adapter.conv.bias",
        "encoder.blocks.0.adapter.linear2.bias",
        "encoder.blocks.0.attn.rel_pos_d",
        "encoder.blocks.0.attn.rel_pos_h",
        "encoder.blocks.0.attn.rel_pos_w",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.norm2.bias",
        "encoder.blocks.0.attn.qkv.weight",
    ];
    check("block 0", &vars, &params, || block.forward(&x).unwrap());
    // Block 1 is unshifted and its tables (global in SAM) are interpolated from 7 rows to 3.
    let block = &net.encoder().blocks()[1];
    check("block 1", &vars, &["encoder.blocks.1.attn.rel_pos_d", "encoder.blocks.1.adapter.linear1.bias"], || {
        block.forward(&x).unwrap()
    });
}

#[test]
fn apg_and_decoder() {
    let cfg = Config::micro();
    let vars = random_vars(&cfg, 3);
    let net = AutoProSam::new(&cfg, builder(&vars)).unwrap();
    let feature = random(&[1, 4, 4, 4, 4], 4);
    let apg = [
        "feature.inc.conv1.weight",
        "feature.inc.conv2.conv.conv.weight",
        "feature.down1.conv.1.conv.conv.weight",
        "feature.down4.conv.2.conv.conv.weight",
        "feature.up1.conv.0.conv.conv.weight",
        "feature.up4.conv.1.conv.conv.weight",
        "feature.outc.bias",
    ];
    check("apg", &vars, &apg, || net.apg().forward(&feature).unwrap());
    let features: Vec<Tensor> = (0..4).map(|k| random(&[1, 4, 4, 4, 4], 10 + k)).collect();
    let crop = random(&[1, 1, 16, 16, 16], 5);
    let decoder = [
        "decoder.mlahead.head2.0.weight",
        "decoder.mlahead.head5.3.weight",
        "decoder.cls.0.weight",
        "decoder.cls.3.weight",
    ];
    check("decoder", &vars, &decoder, || net.decoder().forward(&features, &crop).unwrap());
}

#[test]
fn whole_teacher_reaches_every_stage1_parameter() {
    let cfg = Config::micro();
    let vars = random_vars(&cfg, 6);
    let net = AutoProSam::new(&cfg, builder(&vars)).unwrap();
    let crop = random(&[1, 1, 16, 16, 16], 8);
    let logits = net.forward_checked(&crop).unwrap();
    assert_eq!(logits.dims(), [1, 3, 16, 16, 16]);
    let grads = (&logits * random(logits.dims(), 9)).unwrap().sum_all().unwrap().backward().unwrap();
    let mut trainable = 0;
    for (name, var) in &vars {
        if !Config::trains_in_stage(name, 1) {
            continue;
        }
        trainable += 1;
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("`{name}` received no gradient"));
        let nonzero = g.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 0.0;
        assert!(nonzero, "`{name}` has an all-zero gradient");
    }
    assert!(trainable > 50, "{trainable} trainable parameters");
    // The new embeddings and a neck, through the whole network.
    let params =
        ["encoder.slice_embed.weight", "encoder.depth_embed", "encoder.neck_3d.0.2.weight", "encoder.neck_3d.3.1.bias"];
    // Through the whole network the differences' truncation error is larger than through one part.
    check_to(1e-5, "teacher", &vars, &params, || net.forward(&crop).unwrap());
}
