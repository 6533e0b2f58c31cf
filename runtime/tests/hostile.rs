//! Hostile inputs to the `prosam` CLI and the runtime library: each test stands for a class of
//! input that once lost data or the process (issue "Hostile inputs"), and fails on the code
//! before its fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Tensor;
use prosam_models::format::{Intensity, Metadata};
use prosam_models::swin_unetr::Config;

fn prosam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts that prosam fails (exit 1, not a signal or a panic) with every one of `needles` in
/// its message; returns the message.
fn assert_fails(args: &[&str], needles: &[&str]) -> String {
    let out = prosam(args);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "prosam {args:?}: {:?}\n{text}", out.status);
    for n in needles {
        assert!(text.contains(n), "prosam {args:?}: the message lacks `{n}`:\n{text}");
    }
    text
}

/// A tiny random student on a coarse grid (fast), `edit` applied to its metadata and tensors.
fn model_with(dir: &Path, name: &str, edit: impl FnOnce(&mut Metadata, &mut Vec<(String, Tensor)>)) -> PathBuf {
    let cfg = Config::tiny();
    let mut tensors = common::random_weights(&cfg, 0.05);
    let mut metadata = Metadata { spacing: [4.0, 4.0, 4.0], roi_size: [64, 32, 32], ..Metadata::btcv(name, cfg) };
    edit(&mut metadata, &mut tensors);
    let path = dir.join(format!("{name}.safetensors"));
    prosam_models::format::save(&path, metadata, &tensors).unwrap();
    path
}

/// A small float32 CT (48 x 40 x 24 at 2 mm) of smooth values, with `edit` applied to its voxels.
fn small_ct(path: &Path, edit: impl FnOnce(&mut Vec<f32>)) -> [usize; 3] {
    let dims = [48, 40, 24];
    let mut data: Vec<f32> =
        (0..dims.iter().product::<usize>()).map(|v| 200.0 * ((v as f32) * 0.013).sin() - 50.0).collect();
    edit(&mut data);
    common::write_nifti_f32(path, dims, &data, [[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]);
    dims
}

fn index(dims: [usize; 3], [i, j, k]: [usize; 3]) -> usize {
    i + dims[0] * (j + dims[1] * k)
}

// ---- 1. Non-finite numbers are refused, never spread through the windows ----

#[test]
fn a_ct_with_non_finite_voxels_is_refused_naming_the_count_and_the_first() {
    let dir = common::scratch_dir("hostile_nan_ct");
    let model = model_with(&dir, "coarse", |_, _| {});
    let ct = dir.join("nan.nii.gz");
    let dims = [48, 40, 24];
    small_ct(&ct, |d| {
        d[index(dims, [30, 20, 10])] = f32::INFINITY;
        d[index(dims, [3, 4, 5])] = f32::NAN;
    });
    let out = dir.join("seg.nii.gz");
    assert_fails(
        &["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "-q"],
        &[s(&ct), "2 non-finite", "(3, 4, 5)"],
    );
    assert!(!out.exists(), "a refused CT left a label map");

    // Finite raw values that the header's scaling takes past float32's range are refused too.
    let big = dir.join("overflow.nii");
    let raw: Vec<i16> = (0..8 * 8 * 8).map(|v| (v % 100) as i16).collect();
    let header = nifti::NiftiHeader {
        sform_code: 1,
        srow_x: [2.0, 0.0, 0.0, 0.0],
        srow_y: [0.0, 2.0, 0.0, 0.0],
        srow_z: [0.0, 0.0, 2.0, 0.0],
        pixdim: [1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0],
        ..Default::default()
    };
    let array = ndarray::Array3::from_shape_vec(ndarray::ShapeBuilder::f([8, 8, 8]), raw).unwrap();
    nifti::writer::WriterOptions::new(&big).reference_header(&header).write_nifti(&array).unwrap();
    // scl_slope (bytes 112..116 of the header), set in the file as a scanner would write it.
    let mut bytes = std::fs::read(&big).unwrap();
    bytes[112..116].copy_from_slice(&1e37f32.to_le_bytes());
    std::fs::write(&big, bytes).unwrap();
    assert_fails(&["segment", "-m", s(&model), "-i", s(&big), "-o", s(&out), "-q"], &[s(&big), "non-finite"]);
}

#[test]
fn a_model_with_non_finite_weights_or_intensity_is_refused_at_load() {
    let dir = common::scratch_dir("hostile_nan_model");
    let ct = dir.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let out = dir.join("seg.nii.gz");
    let nan_weight = model_with(&dir, "nan_weight", |_, tensors| {
        let (_, t) = tensors.iter_mut().find(|(n, _)| n == "swinViT.layers1.0.blocks.0.mlp.linear1.weight").unwrap();
        let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[17] = f32::NAN;
        *t = Tensor::from_vec(values, t.dims(), t.device()).unwrap();
    });
    assert_fails(
        &["segment", "-m", s(&nan_weight), "-i", s(&ct), "-o", s(&out), "-q"],
        &[s(&nan_weight), "non-finite", "mlp.linear1.weight"],
    );
    // Finite parameters whose arithmetic overflows: the window's width is infinite in f64.
    let overflow = model_with(&dir, "overflow_window", |m, _| {
        m.intensity = Intensity::ScaleWindow { a_min: -1e308, a_max: 1.7e308, b_min: 0.0, b_max: 1.0, clip: true };
    });
    assert_fails(&["segment", "-m", s(&overflow), "-i", s(&ct), "-o", s(&out), "-q"], &[s(&overflow), "intensity"]);
    // A z-score whose std is so small that every HU value maps past float32's range.
    let tiny_std = model_with(&dir, "tiny_std", |m, _| {
        m.intensity = Intensity::ClipZScore { lower: -1000.0, upper: 1000.0, mean: 0.0, std: 1e-300 };
    });
    assert_fails(&["segment", "-m", s(&tiny_std), "-i", s(&ct), "-o", s(&out), "-q"], &[s(&tiny_std), "intensity"]);
    assert!(!out.exists());
}

// ---- 2. An output that is not a regular file is refused, never replaced ----

/// A FIFO, and (as root) a character device node, made in the test's own folder.
fn special_files(dir: &Path) -> Vec<PathBuf> {
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut files = vec![fifo];
    let node = dir.join("null_node");
    // The null device's numbers (1, 3): writing to it is harmless; only root may make it.
    if Command::new("mknod").arg(&node).args(["c", "1", "3"]).status().is_ok_and(|s| s.success()) {
        files.push(node);
    } else {
        eprintln!("not root: the device-node case is skipped, the FIFO case runs");
    }
    files
}

fn is_special(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::symlink_metadata(path).unwrap().file_type();
    t.is_fifo() || t.is_char_device()
}

#[test]
fn outputs_that_are_devices_fifos_or_folders_are_refused_and_left_alone() {
    let dir = common::scratch_dir("hostile_special_outputs");
    let model = model_with(&dir, "coarse", |_, _| {});
    let ct = dir.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let seg = dir.join("seg.nii.gz");
    for special in special_files(&dir) {
        let p = s(&special);
        assert_fails(&["quantize", "-m", s(&model), "--to", "f16", "-o", p], &[p, "not a regular file"]);
        assert_fails(
            &["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&seg), "--stats", p, "-q"],
            &[p, "not a regular file"],
        );
        assert!(is_special(&special), "{p} was replaced");
        assert!(!seg.exists(), "the label map was written before the --stats output was refused");
    }
    // A folder is not a file output: one clear message, not the OS's twice.
    let folder = dir.join("a_folder.nii.gz");
    std::fs::create_dir(&folder).unwrap();
    let text =
        assert_fails(&["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&folder), "-q"], &[s(&folder), "is a folder"]);
    assert!(!text.to_lowercase().contains("is a directory"), "{text}");
    assert!(folder.is_dir());
}

/// Runs prosam under an address-space limit (`ulimit -v`, KiB), killed after `seconds`: what a
/// crafted file makes it allocate shows as an abort or a kill instead of the host machine's
/// memory filling.
fn prosam_limited(limit_kib: u64, seconds: u64, args: &[&str]) -> Output {
    let script = format!("ulimit -v {limit_kib}; exec timeout -s KILL {seconds} \"$0\" \"$@\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_prosam"))
        .args(args)
        .output()
        .expect("run prosam under ulimit")
}

// ---- 3. A crafted model file's architecture is bounded and checked against its tensors ----

#[test]
fn a_model_file_declaring_a_huge_network_is_refused_before_anything_is_built() {
    let dir = common::scratch_dir("hostile_huge_config");
    let ct = dir.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let out = dir.join("seg.nii.gz");
    type Case = (&'static str, fn(&mut Config), &'static str);
    let cases: [Case; 4] = [
        ("depths", |c| c.depths[3] = 50_000_000, "depths"),
        ("window", |c| c.window_size = 4000, "window_size"),
        ("features", |c| c.feature_size = 12 << 20, "feature_size"),
        ("heads", |c| c.num_heads = [3, 6, 12, 1 << 40], "heads"),
    ];
    for (name, edit, needle) in cases {
        // The tensors of the tiny student, under metadata that declares another network.
        let path = model_with(&dir, name, |m, _| {
            if let prosam_models::format::Architecture::SwinUnetr(c) = &mut m.architecture {
                edit(c);
            }
        });
        let result = prosam_limited(3 << 20, 60, &["segment", "-m", s(&path), "-i", s(&ct), "-o", s(&out), "-q"]);
        let text = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{name}: {:?}\n{text}", result.status);
        assert!(text.contains(s(&path)) && text.contains(needle), "{name}: {text}");
    }
    // A window larger than any CT: refused by the bounds, not by an allocation.
    let roi = model_with(&dir, "roi", |m, _| m.roi_size = [1 << 20, 1 << 20, 64]);
    let result = prosam_limited(3 << 20, 60, &["segment", "-m", s(&roi), "-i", s(&ct), "-o", s(&out), "-q"]);
    assert_eq!(result.status.code(), Some(1), "{:?}\n{}", result.status, stderr(&result));
    assert!(stderr(&result).contains("roi_size"), "{}", stderr(&result));
    // A configuration that is in bounds but does not match the stored tensors names the first
    // difference.
    let other = model_with(&dir, "fs24", |m, _| {
        m.architecture = prosam_models::format::Architecture::SwinUnetr(Config::small())
    });
    assert_fails(
        &["segment", "-m", s(&other), "-i", s(&ct), "-o", s(&out), "-q"],
        &[s(&other), "patch_embed.proj.weight"],
    );
}

// ---- 4. A crafted checkpoint's pickle is bounded in memory, nesting and opcodes ----

/// A PyTorch-style zip checkpoint (`archive/data.pkl`, stored) holding `pickle`.
fn checkpoint_with_pickle(path: &Path, pickle: &[u8]) {
    use std::io::Write;
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn crafted_checkpoint_pickles_are_refused_within_bounds() {
    let dir = common::scratch_dir("hostile_pickles");
    let out = dir.join("out.safetensors");
    // Memo references that nest: each level is a tuple of four references to the previous one,
    // which an unpickler that copies memo entries materialises 4^24 times.
    let mut memo_bomb = b"\x80\x02]q\x00".to_vec();
    for level in 0u8..24 {
        memo_bomb.push(b'(');
        for _ in 0..4 {
            memo_bomb.extend([b'h', level]);
        }
        memo_bomb.extend([b't', b'q', level + 1]);
    }
    memo_bomb.push(b'.');
    // Three million nested one-tuples: a recursive reader or destructor overflows its stack.
    let mut deep = b"\x80\x02N".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 3_000_000));
    deep.push(b'.');
    for (name, pickle, needle) in [("memo", memo_bomb, "memo"), ("deep", deep, "nest")] {
        let ckpt = dir.join(format!("{name}.pt"));
        checkpoint_with_pickle(&ckpt, &pickle);
        let result = prosam_limited(3 << 20, 60, &["convert", "--monai", s(&ckpt), "-o", s(&out), "-q"]);
        let text = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{name}: {:?}\n{text}", result.status);
        assert!(text.contains(s(&ckpt)) && text.contains(needle), "{name}: {text}");
    }
    assert!(!out.exists());
}

// ---- 6. The default memory budget is the process's effective limit ----

/// Writes a gzipped int16 NIfTI-1 of zeros at 0.7 x 0.7 x 1 mm, streamed (the file is a few
/// hundred KB whatever `dims`).
fn zeros_nifti(path: &Path, dims: [usize; 3]) {
    use std::io::Write;
    let mut header = [0u8; 352];
    let put = |h: &mut [u8; 352], at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut header, 0, &348i32.to_le_bytes());
    for (a, d) in [3, dims[0], dims[1], dims[2], 1, 1, 1, 1].into_iter().enumerate() {
        put(&mut header, 40 + 2 * a, &(d as i16).to_le_bytes());
    }
    put(&mut header, 70, &4i16.to_le_bytes()); // int16
    put(&mut header, 72, &16i16.to_le_bytes());
    for (a, p) in [1.0f32, 0.7, 0.7, 1.0].into_iter().enumerate() {
        put(&mut header, 76 + 4 * a, &p.to_le_bytes());
    }
    put(&mut header, 108, &352f32.to_le_bytes());
    put(&mut header, 254, &1i16.to_le_bytes()); // sform_code
    for (r, row) in [[0.7f32, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]].iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(&mut header, 280 + 16 * r + 4 * c, &v.to_le_bytes());
        }
    }
    put(&mut header, 344, b"n+1\0");
    let file = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    gz.write_all(&header).unwrap();
    let plane = vec![0u8; dims[0] * dims[1] * 2];
    for _ in 0..dims[2] {
        gz.write_all(&plane).unwrap();
    }
    gz.finish().unwrap();
}

#[test]
fn under_an_address_space_limit_a_large_ct_is_refused_not_aborted() {
    let dir = common::scratch_dir("hostile_rlimit");
    let model = model_with(&dir, "coarse", |_, _| {});
    let ct = dir.join("large.nii.gz");
    zeros_nifti(&ct, [512, 512, 1000]);
    let out = dir.join("seg.nii.gz");
    let result = prosam_limited(2 << 20, 120, &["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "-q"]);
    let text = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{:?}\n{text}", result.status);
    assert!(text.contains("memory budget") && text.contains(s(&ct)), "{text}");
    // A budget given above the limit is capped by it.
    let result = prosam_limited(
        2 << 20,
        120,
        &["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "-q", "--max-memory", "1000T"],
    );
    assert_eq!(result.status.code(), Some(1), "{:?}\n{}", result.status, stderr(&result));
    assert!(stderr(&result).contains("memory budget"), "{}", stderr(&result));
    assert!(!out.exists());
}

// ---- 7. The memory estimate does not wrap ----

#[test]
fn memory_estimates_grow_with_the_batch_and_never_wrap() {
    use prosam_runtime::engine::{SegmentOptions, Segmenter};
    use prosam_runtime::memory::VolumeShape;
    let dir = common::scratch_dir("hostile_estimate_wrap");
    let model = model_with(&dir, "coarse", |_, _| {});
    let affine =
        prosam_runtime::volume::Affine::from_rows([[0.8, 0.0, 0.0, 0.0], [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]);
    let shape = VolumeShape { dims: [512, 512, 400], affine, read_bytes: 4 * 512 * 512 * 400 };
    let need = |batch: usize| {
        Segmenter::load(&model, SegmentOptions { batch, ..SegmentOptions::default() }).unwrap().memory_need(&shape)
    };
    let mut last = 0;
    for batch in [1, 2, 8, 1 << 20, 1 << 44, 1 << 62, usize::MAX] {
        let n = need(batch);
        assert!(n >= last, "batch {batch} needs {n}, less than a smaller batch's {last}");
        last = n;
    }
}

// ---- 8. A model's axis codes orient its input ----

#[test]
fn a_models_axis_codes_decide_how_its_input_is_oriented() {
    use prosam_runtime::engine::{SegmentOptions, Segmenter};
    use prosam_runtime::volume::{Affine, Volume};
    let dir = common::scratch_dir("hostile_axis_codes");
    let cfg = Config::tiny();
    let tensors = common::random_weights(&cfg, 0.05);
    let save = |codes: &str| {
        let path = dir.join(format!("{codes}.safetensors"));
        let metadata = Metadata {
            spacing: [4.0, 4.0, 4.0],
            roi_size: [64, 32, 32],
            axis_codes: codes.into(),
            ..Metadata::btcv(codes, cfg.clone())
        };
        prosam_models::format::save(&path, metadata, &tensors).unwrap();
        Segmenter::load(&path, SegmentOptions::default()).unwrap()
    };
    let (ras, lps) = (save("RAS"), save("LPS"));
    let dims = [48, 40, 24];
    let data: Vec<f32> =
        (0..48 * 40 * 24).map(|v| 300.0 * ((v as f32) * 0.037).sin() + (v % 48) as f32 * 5.0).collect();
    let ct = Volume {
        dims,
        data: data.clone(),
        affine: Affine::from_rows([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]),
    };
    // The same voxels turned half a circle about the body axis: its RAS view is the first one's
    // LPS view.
    let turned = Volume {
        affine: Affine::from_rows([[-2.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]),
        ..ct.clone()
    };
    let probs = |seg: &Segmenter, v: &Volume| seg.probabilities(&seg.preprocess(v).unwrap(), &mut |_, _| true).unwrap();
    let lps_on_ct = probs(&lps, &ct);
    assert_eq!(lps_on_ct, probs(&ras, &turned), "the LPS model did not see its input in LPS order");
    assert_ne!(lps_on_ct, probs(&ras, &ct), "the test cannot tell the orientations apart");
    let labels = |seg: &Segmenter, v: &Volume| seg.segment(v.clone(), &mut |_, _| true).unwrap().labels;
    assert_eq!(labels(&lps, &ct), labels(&ras, &turned));
}

// ---- 9. Classes that do not fit the label type, and label names that cannot be names ----

#[test]
fn models_whose_labels_cannot_be_written_are_refused_at_load() {
    let dir = common::scratch_dir("hostile_labels");
    let ct = dir.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let out = dir.join("seg.nii.gz");
    // 300 classes: labels 256..299 would wrap to 0..43 in a uint8 map.
    let cfg = Config { out_channels: 300, ..Config::tiny() };
    let wide = dir.join("wide.safetensors");
    let metadata = Metadata { spacing: [4.0, 4.0, 4.0], roi_size: [64, 32, 32], ..Metadata::btcv("wide", cfg.clone()) };
    prosam_models::format::save(&wide, metadata, &common::random_weights(&cfg, 0.05)).unwrap();
    assert_fails(&["segment", "-m", s(&wide), "-i", s(&ct), "-o", s(&out), "-q"], &[s(&wide), "300", "256"]);
    type Case = (&'static str, fn(&mut Vec<String>), &'static str);
    let bad_names: [Case; 3] = [
        ("duplicate", |l| l[3] = l[2].clone(), "right_kidney"),
        ("control", |l| l[4] = "gall\nbladder".into(), "control"),
        ("empty", |l| l[5] = String::new(), "empty"),
    ];
    for (name, edit, needle) in bad_names {
        let path = model_with(&dir, name, |m, _| edit(&mut m.labels));
        assert_fails(&["segment", "-m", s(&path), "-i", s(&ct), "-o", s(&out), "-q"], &[s(&path), needle]);
    }
    assert!(!out.exists());
}

// ---- 10. Paths that are not UTF-8 ----

#[test]
fn latin1_paths_work_end_to_end() {
    use std::os::unix::ffi::OsStrExt;
    let dir = common::scratch_dir("hostile_latin1");
    // "Müller" in Latin-1, as old PACS exports name folders.
    let folder = dir.join(std::ffi::OsStr::from_bytes(b"M\xfcller"));
    std::fs::create_dir(&folder).unwrap();
    let model = model_with(&folder, "coarse", |_, _| {});
    let ct = folder.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let out = folder.join("seg.nii.gz");
    let stats = folder.join("stats.json");
    let result = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["segment", "-q", "--json", "-m"])
        .arg(&model)
        .arg("-i")
        .arg(&ct)
        .arg("-o")
        .arg(&out)
        .arg("--stats")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(result.status.success(), "{:?}\n{}", result.status, stderr(&result));
    assert!(out.is_file() && stats.is_file());
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert!(report["provenance"]["input"].as_str().unwrap().contains("ller"), "{report}");
    let info = Command::new(env!("CARGO_BIN_EXE_prosam")).args(["info", "--json", "-m"]).arg(&model).output().unwrap();
    assert!(info.status.success(), "{:?}\n{}", info.status, stderr(&info));
    serde_json::from_slice::<serde_json::Value>(&info.stdout).unwrap();
    if let Some(series) = common::shared_folder("data/example_ct_dicom") {
        let link = folder.join(std::ffi::OsStr::from_bytes(b"s\xe9rie"));
        std::os::unix::fs::symlink(&series, &link).unwrap();
        let listing =
            Command::new(env!("CARGO_BIN_EXE_prosam")).args(["dicom-info", "--json"]).arg(&link).output().unwrap();
        assert!(listing.status.success(), "{:?}\n{}", listing.status, stderr(&listing));
        serde_json::from_slice::<serde_json::Value>(&listing.stdout).unwrap();
    }
}

// ---- 14. Thread counts are bounded ----

#[test]
fn an_absurd_thread_count_is_refused_at_once() {
    let dir = common::scratch_dir("hostile_threads");
    let model = model_with(&dir, "coarse", |_, _| {});
    let result = prosam_limited(8 << 20, 30, &["--threads", "1000000", "info", "-m", s(&model)]);
    assert_eq!(result.status.code(), Some(1), "{:?}\n{}", result.status, stderr(&result));
    assert!(stderr(&result).contains("--threads"), "{}", stderr(&result));
}

// ---- 12. Every output is checked before any work ----

#[test]
fn outputs_that_cannot_be_written_fail_before_inference() {
    let dir = common::scratch_dir("hostile_late_failures");
    let model = model_with(&dir, "coarse", |_, _| {});
    let ct = dir.join("ct.nii.gz");
    small_ct(&ct, |_| {});
    let seg = dir.join("seg.nii.gz");
    let missing = dir.join("no_such_folder").join("stats.json");
    assert_fails(
        &["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&seg), "--stats", s(&missing), "-q"],
        &[s(&missing)],
    );
    assert!(!seg.exists(), "the label map was written before the --stats folder was found missing");
    // A name that fits the folder but whose temporary sibling would not (255 bytes a name).
    let long = dir.join(format!("s.{}.json", "x".repeat(240)));
    assert_fails(&["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&seg), "--stats", s(&long), "-q"], &["too long"]);
    assert!(!seg.exists(), "the label map was written before the --stats name was found too long");
}

// ---- 13. Temporary files of live runs are never removed, whatever their PID namespace ----

#[test]
fn a_locked_temporary_file_survives_another_runs_cleanup() {
    use std::os::fd::AsRawFd;
    let dir = common::scratch_dir("hostile_temp_locks");
    // A PID no process here has (above Linux's largest pid_max): as a run in another PID
    // namespace looks from this one.
    let foreign = dir.join(".prosam-tmp-999999999-0.nii.gz");
    let file = std::fs::File::create(&foreign).unwrap();
    // The live writer holds its file locked.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    prosam_models::temp_file::write_via_temp(&dir.join("out.json"), |tmp| std::fs::write(tmp, b"{}")).unwrap();
    assert!(foreign.exists(), "another run's locked temporary file was removed");
    // Once its writer is gone (the lock released with the file), the next write removes it.
    drop(file);
    prosam_models::temp_file::write_via_temp(&dir.join("out.json"), |tmp| std::fs::write(tmp, b"{}")).unwrap();
    assert!(!foreign.exists(), "a dead run's temporary file was left");
}

// ---- 15. Messages that say what happened ----

#[test]
fn a_fifo_input_is_named_for_what_it_is() {
    let dir = common::scratch_dir("hostile_fifo_input");
    let model = model_with(&dir, "coarse", |_, _| {});
    let fifo = dir.join("ct.nii");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = dir.join("seg.nii.gz");
    // Opening a FIFO for reading waits for a writer: a reader that opens it hangs (killed here).
    let result = prosam_limited(8 << 20, 30, &["segment", "-m", s(&model), "-i", s(&fifo), "-o", s(&out), "-q"]);
    let text = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{:?}\n{text}", result.status);
    assert!(text.contains(s(&fifo)) && text.contains("not a regular file"), "{text}");
    assert!(!text.contains("no such file"), "{text}");
}

/// A 1 MiB tmpfs mounted for the test (root only), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&path).status();
        ok.is_ok_and(|s| s.success()).then_some(SmallDisk(path))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_said_once_in_words() {
    let dir = common::scratch_dir("hostile_full_disk");
    let Some(disk) = SmallDisk::mount(dir.join("small_disk")) else {
        eprintln!("skipping: cannot mount a tmpfs (not root)");
        return;
    };
    let model = model_with(&dir, "coarse", |_, _| {});
    let out = disk.0.join("f16.safetensors");
    let text = assert_fails(
        &["quantize", "-m", s(&model), "--to", "f16", "-o", s(&out)],
        &[s(&out), "No space left on device"],
    );
    assert_eq!(text.matches("No space left").count(), 1, "{text}");
    assert!(!text.contains("Os {"), "{text}");
    assert!(common::temp_files_in(&disk.0).is_empty(), "a temporary file was left on the full disk");
}
