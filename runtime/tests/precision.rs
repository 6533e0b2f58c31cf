//! f16 and int8 students: smaller files, the same organs (`prosam quantize`, `prosam info`, and the
//! pipeline on the example CT with each precision).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Module};
use prosam_models::format::{ModelFile, Precision};
use prosam_runtime::engine::{SegmentOptions, Segmenter};
use prosam_runtime::volume::nifti;

fn prosam(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fs 12 fixture as f32, f16 and int8 model files.
fn models(dir: &Path) -> Option<[PathBuf; 3]> {
    let ckpt = common::shared_file("fixtures/monai/swinunetr_fs12.pt")?;
    let f32_model = dir.join("fs12.safetensors");
    let (ok, err) = prosam(&["convert", "--monai", s(&ckpt), "-o", s(&f32_model), "--quiet"]);
    assert!(ok, "{err}");
    let out = [f32_model.clone(), dir.join("fs12_f16.safetensors"), dir.join("fs12_int8.safetensors")];
    for (to, path) in [("f16", &out[1]), ("int8", &out[2])] {
        let (ok, err) = prosam(&["quantize", "-m", s(&f32_model), "--to", to, "-o", s(path)]);
        assert!(ok, "{err}");
    }
    Some(out)
}

#[test]
fn smaller_files_with_their_precision_shown() {
    let dir = common::scratch_dir("precision_files");
    let Some([f32_model, f16_model, int8_model]) = models(&dir) else { return };
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let (f16_ratio, int8_ratio) = (size(&f16_model) / size(&f32_model), size(&int8_model) / size(&f32_model));
    eprintln!("f16 {:.1}% and int8 {:.1}% of the f32 file", f16_ratio * 100.0, int8_ratio * 100.0);
    assert!(f16_ratio <= 0.52 && int8_ratio <= 0.30, "f16 {f16_ratio}, int8 {int8_ratio}");
    for (path, precision) in [(&f16_model, "f16"), (&int8_model, "int8")] {
        let (ok, out) = prosam(&["info", "-m", s(path), "--json"]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        assert_eq!(v["precision"], precision);
    }

    // Bad requests: an int8 model again, an unknown precision, metadata that disagrees with the tensors.
    let again = dir.join("again.safetensors");
    let (ok, err) = prosam(&["quantize", "-m", s(&int8_model), "--to", "int8", "-o", s(&again)]);
    assert!(!ok && err.contains("already int8"), "{err}");
    let (ok, err) = prosam(&["quantize", "-m", s(&f32_model), "--to", "f8", "-o", s(&again)]);
    assert!(!ok && err.contains("unknown precision `f8`"), "{err}");
    assert!(!again.exists());
    let file = ModelFile::open(&int8_model).unwrap();
    let tensors: Vec<_> = file.tensors(&Device::Cpu).unwrap().into_iter().collect();
    let mut lying = file.metadata().clone();
    let dropped = lying.quantized.keys().next().unwrap().clone();
    lying.quantized.remove(&dropped);
    let bad = dir.join("lying.safetensors");
    prosam_models::format::save(&bad, lying, &tensors).unwrap();
    let x = dir.join("x.npy");
    prosam_runtime::npy::write_f32(&x, &[1, 1, 64, 64, 64], &vec![0.0; 64 * 64 * 64]).unwrap();
    let (ok, err) = prosam(&["forward", "-m", s(&bad), "-i", s(&x), "-o", s(&dir.join("y.npy"))]);
    assert!(!ok && err.contains(&dropped) && err.contains("lying.safetensors"), "{err}");
    let mut no_q = file.metadata().clone();
    no_q.precision = Precision::F32;
    no_q.quantized.clear();
    let bad2 = dir.join("no_q.safetensors");
    prosam_models::format::save(&bad2, no_q, &tensors).unwrap();
    let (ok, err) = prosam(&["forward", "-m", s(&bad2), "-i", s(&x), "-o", s(&dir.join("y.npy"))]);
    assert!(!ok && err.contains("no_q.safetensors"), "{err}");
}

#[test]
fn f16_and_int8_segment_the_same_organs() {
    let dir = common::scratch_dir("precision_labels");
    let (Some([f32_model, f16_model, int8_model]), Some(io), Some(ct), Some(f32_labels)) = (
        models(&dir),
        common::shared_file("fixtures/monai/swinunetr_fs12_io.safetensors"),
        common::shared_file("data/example_ct_sm.nii.gz"),
        common::shared_file("fixtures/monai/ct_sm_fs12_labels.nii.gz"),
    ) else {
        return;
    };
    // Raw logits: f16 weights (computed in f32 on the CPU) within 1e-2 of f32.
    let input = &candle_core::safetensors::load(&io, &Device::Cpu).unwrap()["input"];
    let logits = |p: &Path| {
        let net = ModelFile::open(p).unwrap().swin_unetr(DType::F32, &Device::Cpu).unwrap();
        net.forward(input).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b, c) = (logits(&f32_model), logits(&f16_model), logits(&int8_model));
    let max_diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    eprintln!("max |dlogit| vs f32: f16 {:e}, int8 {:e}", max_diff(&a, &b), max_diff(&a, &c));
    assert!(max_diff(&a, &b) <= 1e-2, "f16 logits differ by {}", max_diff(&a, &b));

    // Label maps on the example CT against the f32 pipeline's (MONAI's labels, which it reproduces).
    let expected = nifti::read(&f32_labels).unwrap().volume.data;
    let volume = nifti::read(&ct).unwrap().volume;
    for (path, bound) in [(&f16_model, 0.998), (&int8_model, 0.995)] {
        let seg = Segmenter::load(path, SegmentOptions::default())
            .unwrap()
            .segment(volume.clone(), &mut |_, _| true)
            .unwrap();
        let agree =
            seg.labels.iter().zip(&expected).filter(|(l, e)| **l as f32 == **e).count() as f64 / expected.len() as f64;
        eprintln!("{}: {:.4}% of voxels agree with f32", path.display(), agree * 100.0);
        assert!(agree >= bound, "{}: {agree} < {bound}", path.display());
    }
}
