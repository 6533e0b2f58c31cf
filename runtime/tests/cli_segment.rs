//! `prosam segment` end to end: MONAI's final labels and affine, orientation handling, thread
//! count independence, statistics, and bad input that leaves no partial output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prosam_runtime::volume::nifti;

fn prosam(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fs 12 fixture converted with `prosam convert` (BTCV defaults), or `None` without ../shared.
fn fixture_model(dir: &Path) -> Option<PathBuf> {
    let ckpt = common::shared_file("fixtures/monai/swinunetr_fs12.pt")?;
    let model = dir.join("fs12.safetensors");
    let (ok, err) = prosam(&["convert", "--monai", s(&ckpt), "-o", s(&model), "--quiet"]);
    assert!(ok, "{err}");
    Some(model)
}

#[test]
fn final_labels_and_affine_match_monai() {
    let dir = common::scratch_dir("cli_segment_monai");
    let (Some(model), Some(ct), Some(expected)) = (
        fixture_model(&dir),
        common::shared_file("data/example_ct_sm.nii.gz"),
        common::shared_file("fixtures/monai/ct_sm_fs12_labels.nii.gz"),
    ) else {
        return;
    };
    let out = dir.join("seg.nii.gz");
    let stats = dir.join("stats.json");
    // MONAI's pipeline ends at argmax: no post-processing here.
    let (ok, err) = prosam(&[
        "segment",
        "-m",
        s(&model),
        "-i",
        s(&ct),
        "-o",
        s(&out),
        "--stats",
        s(&stats),
        "--threads",
        "2",
        "--postprocess",
        "none",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("preprocess") && err.contains("infer") && err.contains("write"), "no stage timings: {err}");

    let got = nifti::read(&out).unwrap();
    let want = nifti::read(&expected).unwrap();
    let input = nifti::read(&ct).unwrap();
    assert_eq!(got.volume.dims, want.volume.dims);
    assert_eq!(got.volume.affine, input.volume.affine, "the output keeps the input's affine");
    assert_eq!((got.header.sform_code, got.header.qform_code), (input.header.sform_code, input.header.qform_code));
    assert_eq!(
        (got.header.srow_x, got.header.srow_y, got.header.srow_z),
        (input.header.srow_x, input.header.srow_y, input.header.srow_z)
    );
    assert_eq!(got.header.datatype, 2, "uint8 labels");
    let description = String::from_utf8_lossy(&got.header.descrip).into_owned();
    assert!(
        description.starts_with("prosam ") && description.contains("swinunetr_fs12") && description.contains("sha256:"),
        "{description}"
    );
    let agree = got.volume.data.iter().zip(&want.volume.data).filter(|(a, b)| a == b).count();
    let rate = agree as f64 / got.volume.data.len() as f64;
    eprintln!("final labels agree on {:.4}%", rate * 100.0);
    assert!(rate >= 0.995, "final labels agree on {:.4}%", rate * 100.0);

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(report["provenance"]["model"], "swinunetr_fs12");
    let organs = report["organs"].as_array().unwrap();
    let voxel_ml = input.volume.affine.det3().abs() / 1000.0;
    for organ in organs {
        let label = organ["label"].as_u64().unwrap() as f32;
        let count = got.volume.data.iter().filter(|&&v| v == label).count();
        assert_eq!(organ["voxels"].as_u64().unwrap() as usize, count, "{organ}");
        assert!((organ["volume_ml"].as_f64().unwrap() - count as f64 * voxel_ml).abs() < 1e-6);
    }
    assert!(common::temp_files_in(&dir).is_empty());
}

/// A small CT: size, voxels (x fastest) and sform rows.
type SmallCt = ([usize; 3], Vec<f32>, [[f32; 4]; 3]);

/// A crop of the example CT small enough for one 96^3 window.
fn small_ct() -> Option<SmallCt> {
    let ct = nifti::read(&common::shared_file("data/example_ct_sm.nii.gz")?).unwrap();
    let [nx, ny, _] = ct.volume.dims;
    let dims = [40, 36, 24];
    let (ox, oy, oz) = (40, 30, 3);
    let mut data = Vec::with_capacity(dims.iter().product());
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                data.push(ct.volume.data[(ox + i) + nx * ((oy + j) + ny * (oz + k))]);
            }
        }
    }
    let a = ct.volume.affine.0;
    let rows = [0, 1, 2].map(|r| [a[r][0] as f32, a[r][1] as f32, a[r][2] as f32, a[r][3] as f32]);
    Some((dims, data, rows))
}

#[test]
fn labels_do_not_depend_on_axis_order_or_thread_count() {
    let dir = common::scratch_dir("cli_segment_orientation");
    let (Some(model), Some((dims, data, rows))) = (fixture_model(&dir), small_ct()) else { return };
    let plain = dir.join("plain.nii");
    common::write_nifti_f32(&plain, dims, &data, rows);

    // Stored axes (i', j', k') = (k, i, ny - 1 - j): new axis 0 is old axis 2, new axis 1 old
    // axis 0, new axis 2 old axis 1 reversed; the affine follows so every voxel stays in place.
    let [nx, ny, nz] = dims;
    let new_dims = [nz, nx, ny];
    let mut moved = vec![0f32; data.len()];
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let (a, b, c) = (k, i, ny - 1 - j);
                moved[a + new_dims[0] * (b + new_dims[1] * c)] = data[i + nx * (j + ny * k)];
            }
        }
    }
    // old index = M * new index + t: i = b, j = ny - 1 - c, k = a.
    let mut new_rows = [[0f32; 4]; 3];
    for r in 0..3 {
        new_rows[r][0] = rows[r][2];
        new_rows[r][1] = rows[r][0];
        new_rows[r][2] = -rows[r][1];
        new_rows[r][3] = rows[r][3] + rows[r][1] * (ny - 1) as f32;
    }
    let permuted = dir.join("permuted.nii.gz");
    common::write_nifti_f32(&permuted, new_dims, &moved, new_rows);

    let run = |input: &Path, output: &Path, threads: &str| {
        let (ok, err) =
            prosam(&["segment", "-m", s(&model), "-i", s(input), "-o", s(output), "--threads", threads, "--quiet"]);
        assert!(ok, "{err}");
        nifti::read(output).unwrap().volume
    };
    let a = run(&plain, &dir.join("a2.nii.gz"), "2");
    let b = run(&permuted, &dir.join("b.nii.gz"), "2");
    let classes: std::collections::BTreeSet<u32> = a.data.iter().map(|&v| v as u32).collect();
    assert!(classes.len() >= 3, "a test that cannot fail: only classes {classes:?}");
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let (x, y, z) = (k, i, ny - 1 - j);
                assert_eq!(a.data[i + nx * (j + ny * k)], b.data[x + nz * (y + nx * z)], "voxel ({i}, {j}, {k})");
            }
        }
    }
    let one = run(&plain, &dir.join("a1.nii.gz"), "1");
    assert_eq!(one.data, a.data, "1 and 2 threads give different labels");
}

#[test]
fn bad_input_is_named_and_leaves_nothing() {
    let dir = common::scratch_dir("cli_segment_errors");
    let Some(model) = fixture_model(&dir) else { return };
    let out = dir.join("seg.nii.gz");
    let check = |input: &Path, needles: &[&str]| {
        let (ok, err) = prosam(&["segment", "-m", s(&model), "-i", s(input), "-o", s(&out), "--quiet"]);
        assert!(!ok, "segment accepted {}", input.display());
        for n in needles {
            assert!(err.contains(n), "stderr lacks `{n}`: {err}");
        }
        assert!(!out.exists(), "a failed run left {}", out.display());
        assert!(common::temp_files_in(&dir).is_empty(), "temporary files left");
    };
    let text = dir.join("notes.nii.gz");
    std::fs::write(&text, "not a volume").unwrap();
    check(&text, &["notes.nii.gz", "not a readable NIfTI"]);

    let dims = [8, 6, 4];
    let data: Vec<f32> = (0..192).map(|v| v as f32).collect();
    let rows = [[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]];
    let good = dir.join("good.nii");
    common::write_nifti_f32(&good, dims, &data, rows);
    let good_gz = dir.join("good.nii.gz");
    common::write_nifti_f32(&good_gz, dims, &data, rows);
    let gz = std::fs::read(&good_gz).unwrap();
    let truncated = dir.join("truncated.nii.gz");
    std::fs::write(&truncated, &gz[..gz.len() * 2 / 3]).unwrap();
    check(&truncated, &["truncated.nii.gz"]);

    // Header surgery on the uncompressed file (NIfTI-1 offsets).
    let bytes = std::fs::read(&good).unwrap();
    let patched = |name: &str, edits: &[(usize, Vec<u8>)], extra: usize| {
        let mut b = bytes.clone();
        for (at, v) in edits {
            b[*at..*at + v.len()].copy_from_slice(v);
        }
        b.extend(std::iter::repeat_n(0u8, extra));
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let i16le = |v: i16| v.to_le_bytes().to_vec();
    let f32le = |v: f32| v.to_le_bytes().to_vec();
    check(&patched("zero_dim.nii", &[(42, i16le(0))], 0), &["zero_dim.nii", "size 0"]);
    // No sform or qform: the pixdim affine, with a negative spacing.
    check(&patched("negative.nii", &[(254, i16le(0)), (80, f32le(-2.0))], 0), &["negative.nii", "not positive"]);
    check(
        &patched("singular.nii", &[(280, f32le(0.0)), (296, f32le(0.0)), (312, f32le(0.0))], 0),
        &["singular.nii", "singular"],
    );
    check(&patched("volumes.nii", &[(40, i16le(4)), (48, i16le(2))], 192 * 4), &["volumes.nii", "2 volumes"]);

    let (ok, err) = prosam(&["segment", "-m", s(&model), "-i", s(&good), "-o", s(&dir.join("missing/seg.nii.gz"))]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, err) = prosam(&["segment", "-m", s(&model), "-i", s(&good), "-o", s(&good)]);
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&good).unwrap(), bytes, "the input was modified");
}
