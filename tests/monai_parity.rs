//! prosam against the real MONAI: SwinUNETR checkpoints imported and run in Candle reproduce the
//! logits MONAI 1.6.1 computed (`../shared/fixtures/monai/`).

#[path = "../runtime/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use prosam_models::format::import::{MonaiOptions, import_monai};
use prosam_models::swin_unetr::{Downsample, SwinUnetr};
use prosam_runtime::device::DeviceChoice;

/// The device under test: `PROSAM_TEST_DEVICE` (cpu, cuda[:N], metal[:N]; default cpu), so that a
/// GPU build checks its own parity with `PROSAM_TEST_DEVICE=cuda cargo test --features cuda`.
fn test_device() -> Device {
    let choice = std::env::var("PROSAM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let choice: DeviceChoice = choice.parse().expect("PROSAM_TEST_DEVICE");
    eprintln!("device {choice}");
    choice.open().expect("the device of PROSAM_TEST_DEVICE")
}

fn library_parity(ckpt: &str, io: &str, options: MonaiOptions) {
    let (Some(ckpt), Some(io)) = (common::shared_file(ckpt), common::shared_file(io)) else { return };
    let device = test_device();
    let imported = import_monai(&ckpt, options).expect("import");
    let vb = VarBuilder::from_tensors(imported.tensors.into_iter().collect(), DType::F32, &device);
    let net = SwinUnetr::new(&imported.config, vb).expect("build");
    let fixture = candle_core::safetensors::load(&io, &device).expect("fixture");
    let t0 = std::time::Instant::now();
    let logits = net.forward(&fixture["input"]).expect("forward");
    eprintln!("forward {:?} in {:.2?}", fixture["input"].dims(), t0.elapsed());
    let expected = &fixture["logits"];
    assert_eq!(logits.dims(), expected.dims());
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (max_abs, agree) = common::compare_logits(&flat(&logits), &flat(expected), expected.dim(1).unwrap());
    eprintln!("max |dlogit| = {max_abs:e}, argmax agreement = {:.5}%", agree * 100.0);
    assert!(max_abs <= 1e-4, "max abs logit difference {max_abs} > 1e-4");
    assert!(agree >= 0.9999, "argmax agreement {agree}");
}

#[test]
fn fs12_library_matches_monai() {
    library_parity(
        "fixtures/monai/swinunetr_fs12.pt",
        "fixtures/monai/swinunetr_fs12_io.safetensors",
        MonaiOptions::default(),
    );
}

#[test]
fn fs12_v2_mergingv2_library_matches_monai() {
    library_parity(
        "fixtures/monai/swinunetr_fs12_v2.pt",
        "fixtures/monai/swinunetr_fs12_v2_io.safetensors",
        MonaiOptions { downsample: Downsample::MergingV2, normalize: true },
    );
}
