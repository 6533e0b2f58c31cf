//! `prosam demo`, and `prosam segment` without `-m`: the built-in model segments a phantom,
//! says on stderr that it is for research use only, and the scores match `prosam eval` on the
//! files it wrote.

mod common;

use std::process::Command;

#[test]
fn demo_scores_its_phantom_and_segment_falls_back_to_the_built_in_model() {
    let dir = common::scratch_dir("cli_demo");
    let out = dir.join("demo");
    let run = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["--threads", "2", "demo", "--json", "--seed", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("built-in model prosam_ct_tiny") && stderr.contains("not for clinical decisions"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let dice = report["dice"].as_object().unwrap();
    assert_eq!(dice.len(), 13, "every BTCV organ of the phantom is scored: {report}");
    assert!(report["mean_dice"].is_number(), "{report}");

    // The same figures from `prosam eval` on the written files.
    let eval = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["eval", "--json", "--pred"])
        .arg(out.join("segmentation.nii.gz"))
        .arg("--truth")
        .arg(out.join("truth.nii.gz"))
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let again: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(again["dice"], report["dice"]);
    assert_eq!(again["mean_nsd"], report["mean_nsd"]);

    // `segment` without -m on the phantom the demo wrote gives the demo's label map.
    let seg = dir.join("seg.nii.gz");
    let run = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["--threads", "2", "segment", "-i"])
        .arg(out.join("phantom.nii.gz"))
        .arg("-o")
        .arg(&seg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && stderr.contains("built-in model prosam_ct_tiny"), "{stderr}");
    let a = prosam_runtime::volume::nifti::read(&seg).unwrap().volume;
    let b = prosam_runtime::volume::nifti::read(&out.join("segmentation.nii.gz")).unwrap().volume;
    assert_eq!(a.data, b.data);
}

#[test]
fn info_without_a_model_gives_the_built_in_ones_provenance() {
    let run = Command::new(env!("CARGO_BIN_EXE_prosam")).args(["info"]).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for needle in ["prosam_ct_tiny", "trained on", "BTCV", "licence", "Research use only", "not for clinical decisions"]
    {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}
