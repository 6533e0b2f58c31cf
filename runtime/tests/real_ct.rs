//! The built-in student on real CTs it never saw in training (TotalSegmentator's example CT and
//! DICOM series, `../shared/data`), through the CLI a user runs: `prosam segment` without `-m`,
//! then `prosam eval --truth-map` with TotalSegmentator's labels mapped to BTCV's. The floors sit
//! a little under what the shipped student measured (its card, `models/zoo/README.md`, has the
//! figures); the old phantom-trained student, kept as a fixture, is shown to fail the same check.
//!
//! The goal (issue 22) is higher than what the student reaches yet: liver, spleen and kidneys at
//! 0.80 and a mean of 0.65 on `example_ct_sm`, every organ on its side and of a plausible volume on
//! the whole CT. The floors ratchet: they are what holds now, and the organs the whole-CT check
//! still finds wrong are listed, so that a better student must raise the floors and shorten the
//! list (a listed organ that is clearly right fails the test until it is taken off).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prosam_runtime::volume::{Volume, nifti};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// TotalSegmentator v2's labels to BTCV's (`../shared/data/README.md`).
fn truth_map() -> PathBuf {
    common::workspace_root().join("models/label_maps/totalsegmentator_v2_to_btcv.json")
}

fn phantom_student() -> PathBuf {
    common::workspace_root().join("testdata/prosam_phantom_tiny.safetensors")
}

/// `prosam segment` on `input` with `model` (the built-in one when `None`): the label map's path.
fn segment(input: &Path, model: Option<&Path>, out: &Path) -> PathBuf {
    let seg = out.join("segmentation.nii.gz");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prosam"));
    cmd.args(["--threads", "2", "segment", "-i", s(input), "-o", s(&seg)]);
    if let Some(model) = model {
        cmd.args(["-m", s(model)]);
    }
    let run = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "segment {}: {stderr}", input.display());
    if model.is_none() {
        assert!(stderr.contains("prosam_ct_tiny") && stderr.contains("research use"), "{stderr}");
    }
    seg
}

/// Per-organ Dice of `pred` against TotalSegmentator's `truth` (renumbered to BTCV) from
/// `prosam eval --json`, for the organs the truth holds, and their mean.
fn dice_against_totalsegmentator(pred: &Path, truth: &Path) -> (BTreeMap<String, f64>, f64) {
    let run = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["eval", "--json", "--pred", s(pred), "--truth", s(truth), "--truth-map", s(&truth_map())])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let organs = report["organs"].as_object().unwrap();
    let dice: BTreeMap<String, f64> = organs
        .iter()
        .filter(|(_, m)| m["truth_voxels"].as_u64().unwrap() > 0)
        .map(|(name, m)| (name.clone(), m["dice"].as_f64().unwrap_or(0.0)))
        .collect();
    let mean = dice.values().sum::<f64>() / dice.len() as f64;
    for (name, d) in &dice {
        eprintln!("  {name:<26} {d:.3}");
    }
    eprintln!("  {:<26} {mean:.3} over {} organs", "mean", dice.len());
    (dice, mean)
}

/// Floors on `example_ct_sm` (the organs the truth holds): a little under what the shipped student
/// measured.
const SM_FLOORS: &[(&str, f64)] = &[
    ("liver", 0.85),
    ("spleen", 0.82),
    ("right_kidney", 0.69),
    ("left_kidney", 0.60),
    ("gallbladder", 0.50),
    ("inferior_vena_cava", 0.40),
];
const SM_MEAN_FLOOR: f64 = 0.42;
/// Floors on the DICOM series (20 slices, 40 mm: thinner than the student's window).
const DICOM_FLOORS: &[(&str, f64)] = &[("liver", 0.77)];
const DICOM_MEAN_FLOOR: f64 = 0.18;

fn assert_floors(dice: &BTreeMap<String, f64>, mean: f64, floors: &[(&str, f64)], mean_floor: f64) {
    for &(organ, floor) in floors {
        let d = dice.get(organ).copied().unwrap_or_else(|| panic!("{organ} missing from the truth"));
        assert!(d >= floor, "{organ}: Dice {d:.3} under its floor {floor}");
    }
    assert!(mean >= mean_floor, "mean Dice {mean:.3} under its floor {mean_floor}");
}

#[test]
fn the_built_in_student_segments_the_example_ct() {
    let (Some(ct), Some(truth)) =
        (common::shared_file("data/example_ct_sm.nii.gz"), common::shared_file("data/example_ct_sm_seg.nii.gz"))
    else {
        return;
    };
    let dir = common::scratch_dir("real_ct_sm");
    eprintln!("example_ct_sm, built-in student:");
    let (dice, mean) = dice_against_totalsegmentator(&segment(&ct, None, &dir), &truth);
    assert_floors(&dice, mean, SM_FLOORS, SM_MEAN_FLOOR);

    // The phantom-trained student (the previous built-in one) fails the same CT: the fixture for
    // checks that must catch a model that does not work.
    let old = dir.join("phantom_student");
    std::fs::create_dir_all(&old).unwrap();
    eprintln!("example_ct_sm, phantom-trained fixture:");
    let (_, old_mean) = dice_against_totalsegmentator(&segment(&ct, Some(&phantom_student()), &old), &truth);
    assert!(old_mean < 0.30 && old_mean + 0.15 < mean, "phantom student {old_mean:.3}, built-in {mean:.3}");
}

#[test]
fn the_built_in_student_segments_the_dicom_series() {
    let (Some(series), Some(truth)) =
        (common::shared_folder("data/example_ct_dicom"), common::shared_file("data/example_ct_dicom_seg.nii.gz"))
    else {
        return;
    };
    let dir = common::scratch_dir("real_ct_dicom");
    eprintln!("example_ct_dicom, built-in student:");
    let (dice, mean) = dice_against_totalsegmentator(&segment(&series, None, &dir), &truth);
    assert_floors(&dice, mean, DICOM_FLOORS, DICOM_MEAN_FLOOR);
}

/// What the built-in student still gets wrong on the whole example CT (side or volume).
const STILL_WRONG_ON_THE_WHOLE_CT: &[&str] =
    &["inferior_vena_cava", "left_adrenal_gland", "pancreas", "right_adrenal_gland", "stomach"];

/// Organ volumes in mL of the 30 BTCV anatomies: (min, max) per BTCV label.
fn btcv_volume_ranges(folder: &Path) -> BTreeMap<u8, (f64, f64)> {
    let mut ranges: BTreeMap<u8, (f64, f64)> = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nii.gz"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 30, "{}: expected the 30 BTCV label maps", folder.display());
    for file in files {
        let v = nifti::read(&file).unwrap().volume;
        for (label, ml) in organ_volumes_ml(&v) {
            let r = ranges.entry(label).or_insert((f64::MAX, 0.0));
            *r = (r.0.min(ml), r.1.max(ml));
        }
    }
    ranges
}

fn organ_volumes_ml(v: &Volume) -> BTreeMap<u8, f64> {
    let voxel_ml = v.affine.det3().abs() / 1000.0;
    let mut counts = BTreeMap::new();
    for &x in &v.data {
        if x > 0.0 {
            *counts.entry(x as u8).or_insert(0u64) += 1;
        }
    }
    counts.into_iter().map(|(l, c)| (l, c as f64 * voxel_ml)).collect()
}

/// Per label: the world-coordinate centroid and whether the organ touches the volume's faces.
fn centroids_and_edges(v: &Volume) -> BTreeMap<u8, ([f64; 3], bool)> {
    let [nx, ny, nz] = v.dims;
    let mut acc: BTreeMap<u8, ([f64; 3], u64, bool)> = BTreeMap::new();
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let label = v.data[i + nx * (j + ny * k)] as u8;
                if label == 0 {
                    continue;
                }
                let p = v.affine.apply([i as f64, j as f64, k as f64]);
                let e = acc.entry(label).or_insert(([0.0; 3], 0, false));
                (0..3).for_each(|a| e.0[a] += p[a]);
                e.1 += 1;
                e.2 |= i == 0 || j == 0 || k == 0 || i + 1 == nx || j + 1 == ny || k + 1 == nz;
            }
        }
    }
    acc.into_iter().map(|(l, (sum, n, edge))| (l, (sum.map(|x| x / n as f64), edge))).collect()
}

/// The world x of the body's centroid (voxels over -500 HU): the midline the sides are told by.
fn body_midline_x(ct: &Volume) -> f64 {
    let [nx, ny, _] = ct.dims;
    let (mut sum, mut n) = (0.0, 0u64);
    for (idx, &hu) in ct.data.iter().enumerate() {
        if hu > -500.0 {
            let (i, j, k) = (idx % nx, (idx / nx) % ny, idx / (nx * ny));
            sum += ct.affine.apply([i as f64, j as f64, k as f64])[0];
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn on_the_whole_example_ct_organs_lie_on_their_side_with_plausible_volumes() {
    let (Some(ct_path), Some(anatomies)) =
        (common::shared_file("data/example_ct.nii.gz"), common::shared_folder("data/btcv_labels"))
    else {
        return;
    };
    let dir = common::scratch_dir("real_ct_whole");
    let seg = nifti::read(&segment(&ct_path, None, &dir)).unwrap().volume;
    let ct = nifti::read(&ct_path).unwrap().volume;
    let names = prosam_models::format::BTCV_LABELS;
    let midline = body_midline_x(&ct);
    let organs = centroids_and_edges(&seg);
    let volumes = organ_volumes_ml(&seg);
    let ranges = btcv_volume_ranges(&anatomies);
    // RAS world: the patient's right is +x.
    let right = [2u8, 4, 6, 9, 12];
    let left = [1u8, 3, 7, 13];
    let known: std::collections::BTreeSet<&str> = STILL_WRONG_ON_THE_WHOLE_CT.iter().copied().collect();
    let (mut wrong, mut clearly_right) = (std::collections::BTreeSet::new(), Vec::new());
    for (&label, &(centroid, edge)) in &organs {
        let name = names[label as usize];
        let (lo, hi) = ranges[&label];
        // The 30 anatomies' range widened by 50% (a quarter of its width on each side).
        let (lo, hi) = (lo - (hi - lo) / 4.0, hi + (hi - lo) / 4.0);
        let ml = volumes[&label];
        eprintln!(
            "{name:<26} {ml:>8.1} mL (anatomies widened: {:.1}..{hi:.1}) x {:+.0} mm from the midline{}",
            lo.max(0.0),
            centroid[0] - midline,
            if edge { ", touches the scan's edge" } else { "" }
        );
        // Millimetres on the organ's own side (positive when right), for sided organs.
        let side_margin = if right.contains(&label) {
            Some(centroid[0] - midline)
        } else if left.contains(&label) {
            Some(midline - centroid[0])
        } else {
            None
        };
        let wrong_side = side_margin.is_some_and(|m| m <= 0.0);
        let implausible = !edge && !(lo..=hi).contains(&ml);
        if wrong_side || implausible {
            eprintln!("  {name}: {}", if wrong_side { "on the wrong side" } else { "implausible volume" });
            wrong.insert(name);
        } else if side_margin.is_none_or(|m| m > 10.0) {
            clearly_right.push(name);
        }
    }
    let new: Vec<_> = wrong.difference(&known).collect();
    assert!(new.is_empty(), "newly wrong on the whole CT (side or volume): {new:?}");
    // A listed organ now clearly right (10 mm on its side, a plausible volume) must come off the
    // list; one only just across the midline is left alone, so that rounding cannot flip the test.
    let fixed: Vec<_> = clearly_right.iter().filter(|n| known.contains(*n)).collect();
    assert!(fixed.is_empty(), "now right: take {fixed:?} off STILL_WRONG_ON_THE_WHOLE_CT");
    for label in [1u8, 2, 3, 6, 8, 9] {
        assert!(organs.contains_key(&label), "no {} found in the whole abdominal CT", names[label as usize]);
    }
    assert!(organs[&9].0[0] > organs[&8].0[0], "the IVC is not right of the aorta");
}
