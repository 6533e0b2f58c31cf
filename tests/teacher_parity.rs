//! The AutoProSAM teacher against the released reference code: the `tiny` configuration loaded
//! from `../shared/fixtures/autoprosam/teacher_tiny.pt` reproduces every tensor the reference
//! computed (`teacher_tiny_io.safetensors`), for both APG placements.

#[path = "../runtime/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use prosam_models::autoprosam::{ApgInput, AutoProSam, Config};
use prosam_models::format::import::import_autoprosam;

/// The fixture's bound: 10-20x the reference's own f32 rounding error.
const TOLERANCE: f32 = 1e-4;

fn max_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    got.sub(want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn check(name: &str, got: &Tensor, fixture: &HashMap<String, Tensor>) {
    let err = max_diff(got, &fixture[name]);
    eprintln!("{name:24} max |diff| {err:.2e}");
    assert!(err <= TOLERANCE, "{name}: max |diff| {err:e} > {TOLERANCE:e}");
}

#[test]
fn tiny_teacher_reproduces_the_reference_code() {
    let (Some(ckpt), Some(io)) = (
        common::shared_file("fixtures/autoprosam/teacher_tiny.pt"),
        common::shared_file("fixtures/autoprosam/teacher_tiny_io.safetensors"),
    ) else {
        return;
    };
    let device = Device::Cpu;
    let mut cfg = Config::tiny();
    cfg.apg_input = ApgInput::Stage1;
    let imported = import_autoprosam(&ckpt, &cfg).expect("import");
    assert_eq!(imported.masks_checked, 6, "the six shifted blocks' stored masks");
    let vb = VarBuilder::from_tensors(imported.tensors.into_iter().collect(), DType::F32, &device);
    let net = AutoProSam::new(&cfg, vb).expect("build");
    let fx = candle_core::safetensors::load(&io, &device).expect("fixture");
    let input = &fx["input"];

    let encoder = net.encoder();
    check("patch_embed_out", &encoder.patch_embed(input).unwrap(), &fx);
    let mut h = encoder.tokens(input).unwrap();
    check("tokens", &h, &fx);
    let mut taps = Vec::new();
    for (i, block) in encoder.blocks().iter().enumerate() {
        // Each block on the reference's own input, so that an error is pinned to its block.
        h = block.forward(&h).unwrap();
        check(&format!("block_out.{i}"), &h, &fx);
        h = fx[&format!("block_out.{i}")].clone();
        if let Some(k) = cfg.taps.iter().position(|&t| t == i + 1) {
            taps.push(encoder.necks()[k].forward(&h).unwrap());
        }
    }
    for (tap, name) in taps.iter().zip(["tap_b3", "tap_b6", "tap_b9", "tap_b12"]) {
        check(name, tap, &fx);
    }
    let taps: Vec<Tensor> = ["tap_b3", "tap_b6", "tap_b9", "tap_b12"].iter().map(|n| fx[*n].clone()).collect();

    let decoder = net.decoder();
    let inputs = net.decoder_inputs(&taps, ApgInput::Stage1).unwrap();
    check("apg_out", &inputs[3], &fx);
    let mla = decoder.heads(&inputs).unwrap();
    check("decoder_mla_out", &mla, &fx);
    let cls = decoder.classify(&mla, input).unwrap();
    check("decoder_cls_out", &cls, &fx);
    check("logits", &decoder.finish(&cls).unwrap(), &fx);

    let inputs = net.decoder_inputs(&taps, ApgInput::Stage4).unwrap();
    check("apg_out_stage4", &inputs[3], &fx);
    let cls = decoder.classify(&decoder.heads(&inputs).unwrap(), input).unwrap();
    check("decoder_cls_out_stage4", &cls, &fx);
    check("logits_stage4", &decoder.finish(&cls).unwrap(), &fx);

    // End to end, each placement from the crop alone.
    let logits = net.forward_checked(input).unwrap();
    check("logits", &logits, &fx);
    let want = fx["logits"].argmax(1).unwrap();
    assert_eq!(logits.argmax(1).unwrap().ne(&want).unwrap().sum_all().unwrap().to_scalar::<u8>().unwrap(), 0);
    let mut cfg4 = cfg.clone();
    cfg4.apg_input = ApgInput::Stage4;
    let imported = import_autoprosam(&ckpt, &cfg4).unwrap();
    let vb = VarBuilder::from_tensors(imported.tensors.into_iter().collect(), DType::F32, &device);
    check("logits_stage4", &AutoProSam::new(&cfg4, vb).unwrap().forward(input).unwrap(), &fx);
}
