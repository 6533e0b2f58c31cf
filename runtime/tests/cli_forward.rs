//! `prosam convert` + `prosam forward` end to end against MONAI's logits
//! (`../shared/fixtures/monai/`) and the AutoProSAM reference code's (`../shared/fixtures/autoprosam/`),
//! the way an ML engineer checks a port.

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

/// Converts `ckpt` (`source`: `--monai` or `--autoprosam`), writes the fixture's `input` as .npy,
/// runs `prosam forward`, and compares with the fixture's `logits_key`. Returns the model file.
fn convert_and_forward(
    (source, ckpt): (&str, &str),
    io: &str,
    convert_args: &[&str],
    logits_key: &str,
    scratch: &str,
) -> Option<PathBuf> {
    let (Some(ckpt), Some(io)) = (common::shared_file(ckpt), common::shared_file(io)) else { return None };
    let dir = common::scratch_dir(scratch);
    let model = dir.join("model.safetensors");
    let mut args = vec!["convert", source, path_str(&ckpt), "-o", path_str(&model)];
    args.extend_from_slice(convert_args);
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
    let expected = &fixture[logits_key];
    assert_eq!(y.shape, expected.dims());
    let (max_abs, agree) = common::compare_logits(
        &y.data,
        &expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expected.dim(1).unwrap(),
    );
    eprintln!("max |dlogit| = {max_abs:e}, argmax agreement = {:.5}%", agree * 100.0);
    assert!(max_abs <= 1e-4, "max abs logit difference {max_abs} > 1e-4");
    assert!(agree >= 0.9999, "argmax agreement {agree} < 99.99%");
    Some(model)
}

#[test]
fn fs12_convert_and_forward_match_monai() {
    convert_and_forward(
        ("--monai", "fixtures/monai/swinunetr_fs12.pt"),
        "fixtures/monai/swinunetr_fs12_io.safetensors",
        &[],
        "logits",
        "fs12",
    );
}

#[test]
fn fs12_v2_mergingv2_convert_and_forward_match_monai() {
    convert_and_forward(
        ("--monai", "fixtures/monai/swinunetr_fs12_v2.pt"),
        "fixtures/monai/swinunetr_fs12_v2_io.safetensors",
        &["--downsample", "mergingv2"],
        "logits",
        "fs12_v2",
    );
}

/// The teacher's checkpoint as the reference code saves it, in both APG placements; `prosam info`
/// then describes the teacher file.
#[test]
fn teacher_convert_and_forward_match_the_reference_code() {
    let ckpt = "fixtures/autoprosam/teacher_tiny.pt";
    let io = "fixtures/autoprosam/teacher_tiny_io.safetensors";
    let Some(model) = convert_and_forward(
        ("--autoprosam", ckpt),
        io,
        &["--preset", "tiny", "--apg-input", "stage1"],
        "logits",
        "teacher_stage1",
    ) else {
        return;
    };
    convert_and_forward(
        ("--autoprosam", ckpt),
        io,
        &["--preset", "tiny", "--apg-input", "stage4"],
        "logits_stage4",
        "teacher_stage4",
    );

    let out = prosam(&["info", "-m", path_str(&model), "--json"]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta = &info["metadata"];
    assert_eq!(meta["architecture"]["name"], "autoprosam");
    assert_eq!(meta["architecture"]["config"]["apg_input"], "stage1");
    assert_eq!(meta["roi_size"], serde_json::json!([32, 32, 32]));
    assert_eq!(meta["intensity"]["kind"], "clip_z_score");
    assert_eq!(info["parameters"], 2_028_604);
    let out = prosam(&["info", "-m", path_str(&model)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("AutoProSAM teacher") && text.contains("stage 1: 1351664"), "{text}");

    // Another preset's checkpoint: the error names the tensor and both shapes.
    let ckpt = common::shared_file(ckpt).unwrap();
    let dir = common::scratch_dir("teacher_wrong_preset");
    let out = prosam(&[
        "convert",
        "--autoprosam",
        path_str(&ckpt),
        "--preset",
        "vit_b",
        "-o",
        path_str(&dir.join("t.safetensors")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an AutoProSAM teacher checkpoint for this configuration")
            && err.contains("another preset or crop"),
        "{err}"
    );
    assert!(!dir.join("t.safetensors").exists());
}

/// `prosam bench --profile --json`: every run listed, and a median for each part of the network
/// (the twelve SwinUNETR parts), adding up to about one run.
#[test]
fn bench_profiles_each_part_of_the_network() {
    let dir = common::scratch_dir("cli_bench_profile");
    let model = common::coarse_model(&dir);
    let out = prosam(&[
        "--threads",
        "2",
        "bench",
        "-m",
        path_str(&model),
        "--size",
        "64,32,32",
        "--runs",
        "3",
        "--warmup",
        "0",
        "--profile",
        "--json",
    ]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let times: Vec<f64> = report["times_s"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert_eq!(times.len(), 3, "{report}");
    let parts = report["profile_median_s"].as_object().expect("a profile");
    let expected = [
        "patch_embed",
        "swin_stage1",
        "swin_stage2",
        "swin_stage3",
        "swin_stage4",
        "encoders",
        "decoder5",
        "decoder4",
        "decoder3",
        "decoder2",
        "decoder1",
        "out",
    ];
    let mut names: Vec<&str> = parts.keys().map(String::as_str).collect();
    names.sort();
    let mut sorted = expected.to_vec();
    sorted.sort();
    assert_eq!(names, sorted, "{report}");
    let total: f64 = parts.values().map(|t| t.as_f64().unwrap()).sum();
    assert!(parts.values().all(|t| t.as_f64().unwrap() >= 0.0));
    let (lo, hi) = (times.iter().cloned().fold(f64::MAX, f64::min), times.iter().cloned().fold(0.0, f64::max));
    assert!(total >= 0.5 * lo && total <= 1.5 * hi, "parts add up to {total} s, runs took {lo}..{hi} s");
    // Without --profile there is no profile.
    let out =
        prosam(&["bench", "-m", path_str(&model), "--size", "64,32,32", "--runs", "1", "--warmup", "0", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(report["profile_median_s"].is_null(), "{report}");
}
