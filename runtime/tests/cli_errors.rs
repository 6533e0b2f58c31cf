//! Bad input to the `prosam` CLI gets a clear error that names the problem and the file, and
//! nothing is overwritten.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use prosam_models::format::Metadata;
use prosam_models::format::import::{MonaiOptions, from_state_dict};
use prosam_models::swin_unetr::Config;
use prosam_runtime::npy;

/// Runs prosam and returns (success, stderr).
fn prosam(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts that prosam fails with a message containing every one of `needles`.
fn assert_fails(args: &[&str], needles: &[&str]) {
    let (ok, stderr) = prosam(args);
    assert!(!ok, "prosam {args:?} succeeded; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "prosam {args:?}: stderr lacks `{n}`:\n{stderr}");
    }
}

fn metadata(cfg: &Config) -> Metadata {
    Metadata::btcv("random", cfg.clone())
}

/// A tiny student with random weights, `edit` applied to its tensors before saving.
fn random_model(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let cfg = Config::tiny();
    let mut tensors = common::random_weights(&cfg, 0.02);
    edit(&mut tensors);
    let path = dir.join(name);
    prosam_models::format::save(&path, metadata(&cfg), &tensors).unwrap();
    path
}

#[test]
fn forward_rejects_bad_inputs() {
    let dir = common::scratch_dir("cli_errors_forward");
    let model = random_model(&dir, "tiny.safetensors", |_| {});
    let out = dir.join("y.npy");
    let cases: [(&[usize], &str); 4] = [
        (&[1, 1, 32, 32, 32], "one-voxel bottleneck"),
        (&[1, 1, 48, 64, 64], "multiple of 32"),
        (&[1, 2, 64, 32, 32], "the input has 2"),
        (&[1, 64, 32, 32], "expected 5 dimensions"),
    ];
    for (i, (shape, needle)) in cases.iter().enumerate() {
        let x = dir.join(format!("x{i}.npy"));
        npy::write_f32(&x, shape, &vec![0.0; shape.iter().product()]).unwrap();
        assert_fails(&["forward", "-m", s(&model), "-i", s(&x), "-o", s(&out)], &[needle, s(&x)]);
    }
    let good = dir.join("good.npy");
    npy::write_f32(&good, &[1, 1, 64, 32, 32], &vec![0.0; 64 * 32 * 32]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.npy");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(&["forward", "-m", s(&model), "-i", s(&truncated), "-o", s(&out)], &["truncated", s(&truncated)]);
    let text = dir.join("text.npy");
    std::fs::write(&text, "just some text, not an array").unwrap();
    assert_fails(&["forward", "-m", s(&model), "-i", s(&text), "-o", s(&out)], &["not a NumPy", s(&text)]);
    assert!(!out.exists(), "a failed run left an output behind");

    // The output may not be an input; the input is left untouched.
    assert_fails(&["forward", "-m", s(&model), "-i", s(&good), "-o", s(&good)], &["refusing to overwrite"]);
    assert_eq!(std::fs::read(&good).unwrap(), bytes);

    // A valid input runs, and leaves no temporary file beside the output.
    let (ok, stderr) = prosam(&["forward", "-m", s(&model), "-i", s(&good), "-o", s(&out), "--threads", "2"]);
    assert!(ok, "{stderr}");
    assert_eq!(npy::read(&out).unwrap().shape, vec![1, 14, 64, 32, 32]);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn damaged_model_files_are_rejected() {
    let dir = common::scratch_dir("cli_errors_model");
    let model = random_model(&dir, "tiny.safetensors", |_| {});
    let (ok, stdout_err) = prosam(&["info", "-m", s(&model)]);
    assert!(ok, "{stdout_err}");

    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, &bytes).unwrap();
    assert_fails(&["info", "-m", s(&corrupt)], &["checksum mismatch", s(&corrupt)]);

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&["info", "-m", s(&truncated)], &["not a safetensors file", s(&truncated)]);

    let plain = dir.join("plain.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w", Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap())]),
        &plain,
    )
    .unwrap();
    assert_fails(&["info", "-m", s(&plain)], &["no `prosam` metadata", s(&plain)]);

    let x = dir.join("x.npy");
    npy::write_f32(&x, &[1, 1, 64, 32, 32], &vec![0.0; 64 * 32 * 32]).unwrap();
    let y = dir.join("y.npy");
    let misshaped = random_model(&dir, "misshaped.safetensors", |t| {
        let (_, bias) = t.iter_mut().find(|(k, _)| k == "out.conv.conv.bias").unwrap();
        *bias = Tensor::zeros(13, candle_core::DType::F32, &Device::Cpu).unwrap();
    });
    assert_fails(
        &["forward", "-m", s(&misshaped), "-i", s(&x), "-o", s(&y)],
        &["out.conv.conv.bias", "[13]", "[14]", s(&misshaped)],
    );
    let missing =
        random_model(&dir, "missing.safetensors", |t| t.retain(|(k, _)| k != "decoder3.transp_conv.conv.weight"));
    assert_fails(
        &["forward", "-m", s(&missing), "-i", s(&x), "-o", s(&y)],
        &["missing tensor `decoder3.transp_conv.conv.weight`", s(&missing)],
    );
}

#[test]
fn info_json_reports_the_model() {
    let dir = common::scratch_dir("cli_info_json");
    let model = random_model(&dir, "tiny.safetensors", |_| {});
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(["info", "-m", s(&model), "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info --json prints JSON");
    assert_eq!(v["parameters"], 4_078_220, "MONAI's parameter count for fs 12");
    assert_eq!(v["precision"], "f32");
    assert_eq!(v["metadata"]["architecture"]["name"], "swin_unetr");
    assert_eq!(v["metadata"]["architecture"]["config"]["feature_size"], 12);
    assert_eq!(v["metadata"]["labels"][6], "liver");
    assert!(v["metadata"]["checksum"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn convert_rejects_what_is_not_a_swinunetr_checkpoint() {
    let dir = common::scratch_dir("cli_errors_convert");
    let out = dir.join("m.safetensors");
    let text = dir.join("notes.pt");
    std::fs::write(&text, "not a checkpoint at all").unwrap();
    assert_fails(&["convert", "--monai", s(&text), "-o", s(&out)], &["not a zip-format PyTorch checkpoint", s(&text)]);
    assert_fails(&["convert", "--monai", s(&text), "-o", s(&text)], &["refusing to overwrite"]);
    let Some(sam) = common::shared_file("fixtures/sam/sam_vit_tiny.pth") else { return };
    assert_fails(&["convert", "--monai", s(&sam), "-o", s(&out)], &["not a SwinUNETR", s(&sam)]);
    assert!(!out.exists());
}

#[test]
fn import_names_missing_and_misshaped_tensors() {
    let Some(ckpt) = common::shared_file("fixtures/monai/swinunetr_fs12.pt") else { return };
    let state = prosam_models::format::import::pytorch::read_state_dict(&ckpt, |_| true).unwrap();
    assert!(state.iter().any(|(k, _)| k.ends_with("relative_position_index")), "the fixture carries the index buffers");
    let missing: Vec<_> = state.iter().filter(|(k, _)| k != "decoder2.conv_block.conv3.conv.weight").cloned().collect();
    let err = from_state_dict(missing, MonaiOptions::default(), &ckpt).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor `decoder2.conv_block.conv3.conv.weight`") && err.contains("[12, 24, 1, 1, 1]"),
        "{err}"
    );
    let misshaped: Vec<_> = state
        .iter()
        .map(|(k, t)| {
            let t = if k == "swinViT.layers2.0.blocks.1.attn.proj.weight" {
                t.narrow(0, 0, 20).unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect();
    let err = from_state_dict(misshaped, MonaiOptions::default(), &ckpt).unwrap_err().to_string();
    assert!(
        err.contains("swinViT.layers2.0.blocks.1.attn.proj.weight")
            && err.contains("[20, 24]")
            && err.contains("[24, 24]"),
        "{err}"
    );
    // Old names: DataParallel's `module.` prefix and `fc1`/`fc2` MLPs import to the same network.
    let renamed: Vec<_> = state
        .iter()
        .map(|(k, t)| (format!("module.{}", k.replace(".linear1.", ".fc1.").replace(".linear2.", ".fc2.")), t.clone()))
        .collect();
    let imported = from_state_dict(renamed, MonaiOptions::default(), &ckpt).unwrap();
    assert_eq!(imported.config, Config::tiny());
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // `prosam info ... | head -0`: the reader is gone before prosam writes (it reads the model
    // first), so the write fails with a broken pipe, which must not panic.
    let dir = common::scratch_dir("cli_closed_pipe");
    let model = random_model(&dir, "model.safetensors", |_| {});
    let mut child = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["info", "-m", s(&model)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run prosam");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for prosam");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
}
