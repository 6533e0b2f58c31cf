//! `prosam convert` + `prosam forward` end to end against MONAI's logits
//! (`../shared/fixtures/monai/`), the way an ML engineer checks a port.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use prosam_runtime::npy;

fn prosam(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam");
    eprintln!("prosam {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Converts `ckpt`, writes the fixture's `input` as .npy, runs `prosam forward`, and compares.
fn convert_and_forward(ckpt: &str, io: &str, extra_convert_args: &[&str], scratch: &str) {
    let (Some(ckpt), Some(io)) = (common::shared_file(ckpt), common::shared_file(io)) else { return };
    let dir = common::scratch_dir(scratch);
    let model = dir.join("model.safetensors");
    let mut args = vec!["convert", "--monai", path_str(&ckpt), "-o", path_str(&model)];
    args.extend_from_slice(extra_convert_args);
    assert!(prosam(&args).status.success(), "convert failed");

    let fixture = candle_core::safetensors::load(&io, &Device::Cpu).expect("fixture");
    let input = &fixture["input"];
    let x_path: PathBuf = dir.join("x.npy");
    npy::write_f32(&x_path, input.dims(), &input.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
    let y_path = dir.join("y.npy");
    let out = prosam(&[
        "forward",
        "-m",
        path_str(&model),
        "-i",
        path_str(&x_path),
        "-o",
        path_str(&y_path),
        "--threads",
        "2",
    ]);
    assert!(out.status.success(), "forward failed");

    let y = npy::read(&y_path).expect("read logits");
    let expected = &fixture["logits"];
    assert_eq!(y.shape, expected.dims());
    let (max_abs, agree) = common::compare_logits(
        &y.data,
        &expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expected.dim(1).unwrap(),
    );
    eprintln!("max |dlogit| = {max_abs:e}, argmax agreement = {:.5}%", agree * 100.0);
    assert!(max_abs <= 1e-4, "max abs logit difference {max_abs} > 1e-4");
    assert!(agree >= 0.9999, "argmax agreement {agree} < 99.99%");
}

#[test]
fn fs12_convert_and_forward_match_monai() {
    convert_and_forward(
        "fixtures/monai/swinunetr_fs12.pt",
        "fixtures/monai/swinunetr_fs12_io.safetensors",
        &[],
        "fs12",
    );
}

#[test]
fn fs12_v2_mergingv2_convert_and_forward_match_monai() {
    convert_and_forward(
        "fixtures/monai/swinunetr_fs12_v2.pt",
        "fixtures/monai/swinunetr_fs12_v2_io.safetensors",
        &["--downsample", "mergingv2"],
        "fs12_v2",
    );
}
