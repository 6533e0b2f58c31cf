//! DICOM in, DICOM-SEG out: the real JPEG 2000 series of ../shared/data against its reference
//! geometry and an independent reader (pydicom, highdicom: scripts/check_dicom.py), the same labels
//! as through NIfTI, and edited copies of the series that must be refused or handled as documented.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::{DataElement, VR, value::PrimitiveValue};
use dicom_dictionary_std::tags;
use prosam_models::format::Metadata;
use prosam_models::swin_unetr::Config;
use prosam_runtime::pipeline::postprocess;
use prosam_runtime::volume::{dicom, nifti};

const SERIES: &str = "data/example_ct_dicom";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prosam(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().expect("run prosam");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The series folder, or `None` (skip) without ../shared.
fn series_dir() -> Option<PathBuf> {
    common::shared_folder(SERIES)
}

/// The Python of `scripts/python-env.sh`, or `None` (skip) when it was not made; CI makes it, so
/// there its absence fails.
fn checker() -> Option<PathBuf> {
    let python = common::workspace_root().join("target/pyenv/bin/python");
    if python.is_file() {
        return Some(python);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!in_ci, "CI=true but target/pyenv is missing: run scripts/python-env.sh");
    eprintln!("skipping the pydicom/highdicom checks: run scripts/python-env.sh to make target/pyenv");
    None
}

fn check_with_python(python: &Path, args: &[&str]) -> String {
    let script = common::workspace_root().join("scripts/check_dicom.py");
    let out = Command::new(python).arg(script).args(args).output().expect("run check_dicom.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "check_dicom.py {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", stdout.trim());
    stdout
}

/// A random-weight fs 12 student at 4 mm with a 64x64x32 window: the 512x512x20 series becomes
/// 125x125x10 voxels and 9 windows, seconds per run.
fn small_model(dir: &Path) -> PathBuf {
    let cfg = Config::tiny();
    let tensors = common::random_weights(&cfg, 0.05);
    let metadata =
        Metadata { spacing: [4.0, 4.0, 4.0], roi_size: [64, 64, 32], ..Metadata::btcv("dicom_test_random", cfg) };
    let path = dir.join("small.safetensors");
    prosam_models::format::save(&path, metadata, &tensors).unwrap();
    path
}

/// The series files in name order.
fn series_files(series: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(series).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// A copy of the series in `dest`, file `n` passed through `edit` (which may return `false` to
/// leave the file out).
fn edited_copy(series: &Path, dest: &Path, edit: impl Fn(usize, &mut dicom_object::DefaultDicomObject) -> bool) {
    std::fs::create_dir_all(dest).unwrap();
    for (n, file) in series_files(series).iter().enumerate() {
        let mut obj = dicom_object::open_file(file).unwrap();
        if edit(n, &mut obj) {
            obj.write_to_file(dest.join(file.file_name().unwrap())).unwrap();
        }
    }
}

fn put_ds(obj: &mut dicom_object::DefaultDicomObject, tag: dicom_core::Tag, values: &[f64]) {
    let strs = values.iter().map(|v| format!("{v}")).collect();
    obj.put(DataElement::new(tag, VR::DS, PrimitiveValue::Strs(strs)));
}

fn position(obj: &dicom_object::DefaultDicomObject) -> Vec<f64> {
    obj.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()
}

/// `volume` as a float32 NIfTI file with its affine as the sform.
fn save_as_nifti(volume: &prosam_runtime::volume::Volume, path: &Path) {
    let a = volume.affine.0;
    let rows = [0, 1, 2].map(|r| [a[r][0] as f32, a[r][1] as f32, a[r][2] as f32, a[r][3] as f32]);
    common::write_nifti_f32(path, volume.dims, &volume.data, rows);
}

fn read_error(folder: &Path, select: Option<&str>) -> String {
    match dicom::read(folder, select) {
        Ok(_) => panic!("{} was read", folder.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_series_reads_to_the_reference_geometry_and_pydicoms_voxels() {
    let (Some(series), Some(reference)) = (series_dir(), common::shared_file("data/example_ct_dicom_seg.nii.gz"))
    else {
        return;
    };
    let input = dicom::read(&series, None).unwrap();
    let want = nifti::read(&reference).unwrap().volume;
    assert_eq!(input.volume.dims, [512, 512, 20]);
    assert_eq!(input.volume.dims, want.dims);
    let diff = (0..3)
        .flat_map(|i| (0..4).map(move |j| (i, j)))
        .map(|(i, j)| (input.volume.affine.0[i][j] - want.affine.0[i][j]).abs());
    let diff = diff.fold(0f64, f64::max);
    eprintln!("affine vs TotalSegmentator's: max |diff| {diff:.2e}");
    assert!(diff < 1e-3, "{:?} vs {:?}", input.volume.affine, want.affine);
    let (lo, hi) = input.volume.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    eprintln!("HU range {lo}..{hi}");
    assert!(lo == -1024.0 && hi > 1000.0, "HU range {lo}..{hi}: the rescale intercept -1024 was not applied");
    assert_eq!(input.geometry.spacing.map(|v| (v * 1e4).round() / 1e4), [0.9766, 0.9766, 2.0]);
    // The reference segmentation lies on the same voxels: its liver (TotalSegmentator label 5) is
    // soft tissue in this volume, which a flipped or shifted layout would not give.
    let names: Vec<String> = (0..118).map(|l| format!("ts_{l}")).collect();
    let ts_labels: Vec<u8> = want.data.iter().map(|&v| v as u8).collect();
    let stats = postprocess::label_stats(&ts_labels, want.dims, &want.affine, &names, Some(&input.volume));
    let liver = stats.iter().find(|s| s.label == 5).expect("a liver in the reference segmentation");
    let (mean, std) = (liver.hu_mean.unwrap(), liver.hu_std.unwrap());
    eprintln!("reference liver: {} voxels, {mean:.1} +- {std:.1} HU", liver.voxels);
    assert!((30.0..130.0).contains(&mean) && std < 60.0, "liver at {mean} +- {std} HU: the layouts disagree");

    let Some(python) = checker() else { return };
    let dir = common::scratch_dir("dicom_volume");
    let saved = dir.join("volume.nii");
    save_as_nifti(&input.volume, &saved);
    check_with_python(&python, &["volume", s(&series), s(&saved)]);
}

/// dcmtk's encoders, when installed (scripts/install-deps.sh); CI has them, so there their absence fails.
fn dcmtk() -> bool {
    let found = ["dcmcjpeg", "dcmcrle"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if !found {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!in_ci, "CI=true but dcmtk (dcmcjpeg, dcmcrle) is missing: run scripts/install-deps.sh");
        eprintln!("skipping JPEG lossless and RLE: dcmtk is not installed (scripts/install-deps.sh installs it)");
    }
    found
}

#[test]
fn every_lossless_transfer_syntax_reads_to_the_same_volume() {
    use dicom_pixeldata::Transcode;
    use dicom_transfer_syntax_registry::entries::{EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
    let Some(series) = series_dir() else { return };
    let dir = common::scratch_dir("dicom_syntaxes");
    let reference = dicom::read(&series, None).unwrap().volume;
    let mut copies = Vec::new();
    for (name, ts) in
        [("explicit", EXPLICIT_VR_LITTLE_ENDIAN.erased()), ("implicit", IMPLICIT_VR_LITTLE_ENDIAN.erased())]
    {
        let copy = dir.join(name);
        edited_copy(&series, &copy, |_, obj| {
            obj.transcode(&ts).unwrap();
            true
        });
        copies.push((copy, ts.uid().to_string()));
    }
    if dcmtk() {
        // Encoded by dcmtk from the uncompressed copy: JPEG lossless (process 14, selection value 1)
        // and RLE lossless.
        for (name, tool, options, uid) in [
            ("jpeg_lossless", "dcmcjpeg", &["+e1"][..], "1.2.840.10008.1.2.4.70"),
            ("rle", "dcmcrle", &[][..], "1.2.840.10008.1.2.5"),
        ] {
            let copy = dir.join(name);
            std::fs::create_dir_all(&copy).unwrap();
            for file in series_files(&dir.join("explicit")) {
                let status =
                    Command::new(tool).args(options).arg(&file).arg(copy.join(file.file_name().unwrap())).status();
                assert!(status.unwrap().success(), "{tool} failed on {}", file.display());
            }
            copies.push((copy, uid.to_string()));
        }
    }
    for (copy, uid) in copies {
        let read = dicom::read(&copy, None).unwrap();
        assert_eq!(read.series.slices[0].transfer_syntax, uid, "{}", copy.display());
        assert_eq!(read.volume.affine, reference.affine);
        assert!(read.volume.data == reference.data, "{}: voxels differ from the JPEG 2000 series", copy.display());
        eprintln!("{uid}: {} voxels equal to the JPEG 2000 read", read.volume.data.len());
    }
}

#[test]
fn segmenting_the_folder_equals_segmenting_its_nifti_and_the_seg_holds_the_labels() {
    let Some(series) = series_dir() else { return };
    let dir = common::scratch_dir("dicom_segment");
    let model = small_model(&dir);
    let input = dicom::read(&series, None).unwrap();
    let saved = dir.join("volume.nii.gz");
    save_as_nifti(&input.volume, &saved);

    let from_dicom = dir.join("from_dicom.nii.gz");
    let seg = dir.join("seg.dcm");
    let stats = dir.join("stats.json");
    let (ok, stdout, err) = prosam(&[
        "segment",
        "-m",
        s(&model),
        "-i",
        s(&series),
        "-o",
        s(&from_dicom),
        "--dicom-seg",
        s(&seg),
        "--stats",
        s(&stats),
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("CT Body 3.0") && err.contains("20 CT slice(s)"), "the series is not named: {err}");
    let from_nifti = dir.join("from_nifti.nii.gz");
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&saved), "-o", s(&from_nifti), "--quiet"]);
    assert!(ok, "{err}");

    let a = nifti::read(&from_dicom).unwrap();
    let b = nifti::read(&from_nifti).unwrap();
    assert_eq!(a.volume.dims, [512, 512, 20]);
    assert_eq!(a.volume.affine, input.volume.affine, "the label map keeps the series' geometry");
    assert_eq!((a.header.sform_code, a.header.qform_code), (1, 1));
    let differ = a.volume.data.iter().zip(&b.volume.data).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} voxels differ between the DICOM and NIfTI routes");
    let present: std::collections::BTreeSet<u32> = a.volume.data.iter().map(|&v| v as u32).collect();
    assert!(present.len() >= 4, "a test that cannot fail: only labels {present:?}");

    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["dicom_seg"]["segments"].as_u64().unwrap() as usize, present.len() - 1);
    assert_eq!(summary["dicom_seg"]["referenced_instances"], 20);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    for organ in report["organs"].as_array().unwrap() {
        assert!(
            organ["hu_mean"].is_number() && organ["hu_std"].is_number() && organ["truncated"].is_boolean(),
            "{organ}"
        );
    }
    // 20 slices: whatever reaches the first or last one is cut by the scan.
    assert!(report["organs"].as_array().unwrap().iter().any(|o| o["truncated"] == true));
    assert!(common::temp_files_in(&dir).is_empty());

    if let Some(python) = checker() {
        check_with_python(&python, &["seg", s(&series), s(&seg), s(&from_dicom)]);
    }
}

#[test]
fn organ_subsets_and_output_rules() {
    let Some(series) = series_dir() else { return };
    let dir = common::scratch_dir("dicom_subsets");
    let model = small_model(&dir);
    let out = dir.join("seg.dcm");
    let (ok, stdout, err) = prosam(&[
        "segment",
        "-m",
        s(&model),
        "-i",
        s(&series),
        "-o",
        s(&out),
        "--organs",
        "liver,spleen,aorta",
        "--json",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = summary["organs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert!(!names.is_empty() && names.iter().all(|n| ["liver", "spleen", "aorta"].contains(n)), "{names:?}");
    assert_eq!(summary["dicom_seg"]["segments"].as_u64().unwrap() as usize, names.len());
    let obj = dicom_object::open_file(&out).unwrap();
    assert_eq!(obj.element(tags::MODALITY).unwrap().to_str().unwrap().trim(), "SEG");

    let (ok, _, err) =
        prosam(&["segment", "-m", s(&model), "-i", s(&series), "-o", s(&out), "--organs", "liver,lungs"]);
    assert!(!ok && err.contains("\"lungs\"") && err.contains("right_kidney"), "{err}");
    let (ok, _, err) =
        prosam(&["segment", "-m", s(&model), "-i", s(&series), "-o", s(&out), "--postprocess", "liver,heart"]);
    assert!(!ok && err.contains("\"heart\""), "{err}");
    let nifti_in = common::shared_file("data/example_ct_sm.nii.gz").unwrap();
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&nifti_in), "-o", s(&out)]);
    assert!(!ok && err.contains("needs a DICOM series"), "{err}");
    let one_file = series_files(&series).remove(0);
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&one_file), "-o", s(&dir.join("x.nii.gz"))]);
    assert!(!ok && err.contains("one DICOM file"), "{err}");
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&series), "-o", s(&dir.join("x.png"))]);
    assert!(!ok && err.contains(".dcm"), "{err}");
    // Writing into the series' own folder would add a series for the next run to trip on.
    let copy = dir.join("series");
    edited_copy(&series, &copy, |_, _| true);
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&copy), "-o", s(&copy.join("seg.dcm"))]);
    assert!(!ok && err.contains("inside the input folder"), "{err}");
    assert_eq!(series_files(&copy).len(), 20);
}

#[test]
fn edited_series_give_the_documented_errors() {
    let Some(series) = series_dir() else { return };
    let dir = common::scratch_dir("dicom_edits");

    let gap = dir.join("gap");
    edited_copy(&series, &gap, |n, _| n != 7);
    let err = read_error(&gap, None);
    assert!(err.contains("1 slice(s) missing between") && err.contains("4.000 mm gap"), "{err}");

    let mr = dir.join("mr");
    edited_copy(&series, &mr, |n, obj| {
        if n == 3 {
            obj.put(DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("MR")));
        }
        true
    });
    let err = read_error(&mr, None);
    assert!(err.contains("modality \"MR\"") && err.contains("016576.dcm"), "{err}");

    let spacing = dir.join("spacing");
    edited_copy(&series, &spacing, |n, obj| {
        if n == 5 {
            put_ds(obj, tags::PIXEL_SPACING, &[0.8, 0.8]);
        }
        true
    });
    let err = read_error(&spacing, None);
    assert!(err.contains("PixelSpacing [0.8, 0.8]") && err.contains("016578.dcm"), "{err}");

    let uneven = dir.join("uneven");
    edited_copy(&series, &uneven, |n, obj| {
        if n == 10 {
            let mut p = position(obj);
            p[2] += 0.7;
            put_ds(obj, tags::IMAGE_POSITION_PATIENT, &p);
        }
        true
    });
    let err = read_error(&uneven, None);
    assert!(err.contains("slice spacing varies"), "{err}");

    let duplicate = dir.join("duplicate");
    edited_copy(&series, &duplicate, |_, _| true);
    std::fs::copy(series_files(&series)[4].clone(), duplicate.join("copy_of_slice.dcm")).unwrap();
    let err = read_error(&duplicate, None);
    assert!(err.contains("duplicate slices"), "{err}");

    // Gantry tilt: the slice plane turned 15 degrees about x, the positions left on the z axis.
    let (c, sn) = (15f64.to_radians().cos(), 15f64.to_radians().sin());
    let tilted = dir.join("tilted");
    edited_copy(&series, &tilted, |_, obj| {
        put_ds(obj, tags::IMAGE_ORIENTATION_PATIENT, &[1.0, 0.0, 0.0, 0.0, c, sn]);
        true
    });
    let err = read_error(&tilted, None);
    assert!(err.contains("sheared by 15.00 degrees"), "{err}");

    // The same plane with the positions stacked along its normal is an oblique volume, and reads.
    let oblique = dir.join("oblique");
    edited_copy(&series, &oblique, |_, obj| {
        let p = position(obj);
        let k = (-766.5 - p[2]) / 2.0; // 0 for the top slice, 19 for the bottom one
        let normal = [0.0, -sn, c];
        let p0 = [-249.51171875, -437.51171875, -766.5];
        put_ds(obj, tags::IMAGE_ORIENTATION_PATIENT, &[1.0, 0.0, 0.0, 0.0, c, sn]);
        put_ds(obj, tags::IMAGE_POSITION_PATIENT, &[0, 1, 2].map(|a| p0[a] - k * 2.0 * normal[a]));
        true
    });
    let read = dicom::read(&oblique, None).unwrap();
    let a = read.volume.affine.0;
    // Axis 2 runs along the normal (0, -sin, cos) in LPS: (0, sin, cos) * 2 mm in RAS.
    for (r, want) in [0.0, 2.0 * sn, 2.0 * c].iter().enumerate() {
        assert!((a[r][2] - want).abs() < 1e-6, "{a:?}");
    }
    assert_eq!(dicom::plane(&read.series.slices[0].orientation), "oblique");

    // A second series mixed in: an error that lists both, until one is chosen.
    let mixed = dir.join("mixed");
    edited_copy(&series, &mixed, |_, _| true);
    for (n, file) in series_files(&series).iter().take(3).enumerate() {
        let mut obj = dicom_object::open_file(file).unwrap();
        obj.put(DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.826.0.1.3680043.99.1")));
        obj.put(DataElement::new(tags::SERIES_DESCRIPTION, VR::LO, PrimitiveValue::from("bone kernel")));
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(format!("1.2.826.0.1.3680043.99.1.{n}")),
        ));
        obj.write_to_file(mixed.join(format!("other_{n}.dcm"))).unwrap();
    }
    std::fs::write(mixed.join("README.txt"), "not DICOM").unwrap();
    let err = read_error(&mixed, None);
    assert!(err.contains("holds 2 image series") && err.contains("--series"), "{err}");
    assert!(err.contains("1.2.826.0.1.3680043.99.1 \"bone kernel\": 3 CT slice(s)"), "{err}");
    assert!(err.contains("(blank SeriesInstanceUID) \"CT Body 3.0\": 20 CT slice(s)"), "{err}");
    assert_eq!(dicom::read(&mixed, Some("1.2.826.0.1.3680043.99.1")).unwrap().volume.dims, [512, 512, 3]);
    assert_eq!(dicom::read(&mixed, Some("1")).unwrap().volume.dims, [512, 512, 20]);
    assert!(read_error(&mixed, Some("7")).contains("no series \"7\""));

    // dicom-info reports the same, as JSON.
    let (ok, stdout, err) = prosam(&["dicom-info", s(&mixed), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(info["series"].as_array().unwrap().len(), 2);
    assert_eq!(info["series"][0]["segmentable"], true);
    assert_eq!(info["series"][0]["dims"], serde_json::json!([512, 512, 20]));
    assert_eq!(info["series"][0]["plane"], "axial");
    assert_eq!(info["series"][0]["transfer_syntaxes"][0], "JPEG 2000 Image Compression (Lossless Only)");
    assert_eq!(info["ignored"].as_array().unwrap().len(), 1);
    let (ok, stdout, _) = prosam(&["dicom-info", s(&gap)]);
    assert!(ok && stdout.contains("cannot be segmented") && stdout.contains("missing between"), "{stdout}");
}

/// A rescale slope that takes real pixel values past float32's range is refused, naming the
/// count of non-finite voxels and the first one's position (issue "Hostile inputs", class 1).
#[test]
fn a_slope_that_overflows_float32_is_refused() {
    let Some(series) = series_dir() else { return };
    let dir = common::scratch_dir("dicom_overflow");
    let copy = dir.join("overflow");
    edited_copy(&series, &copy, |n, obj| {
        if n == 4 {
            put_ds(obj, tags::RESCALE_SLOPE, &[1e37]);
        }
        true
    });
    let err = read_error(&copy, None);
    assert!(err.contains("non-finite") && err.contains(s(&copy)), "{err}");
}
