//! Label-driven synthesis (`prosam phantom --anatomy`): CTs built around the real BTCV label maps
//! keep every organ on its anatomical side, are deterministic per seed, and bad label maps are
//! clear errors naming the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use prosam_runtime::phantom::{Bowel, LabelAnatomy, PhantomOptions, generate_from, label};

fn coarse() -> PhantomOptions {
    PhantomOptions { in_plane_mm: (3.0, 3.5), slice_mm: (3.0, 4.0), ..PhantomOptions::default() }
}

/// World (RAS mm) centroid of `l` in a generated case, if present.
fn centroid(p: &prosam_runtime::phantom::Phantom, l: u8) -> Option<[f64; 3]> {
    let [nx, ny, _] = p.image.dims;
    let (mut sum, mut n) = ([0.0; 3], 0usize);
    for (i, _) in p.labels.iter().enumerate().filter(|(_, v)| **v == l) {
        let w = p.image.affine.apply([(i % nx) as f64, ((i / nx) % ny) as f64, (i / (nx * ny)) as f64]);
        (0..3).for_each(|a| sum[a] += w[a]);
        n += 1;
    }
    (n > 0).then(|| sum.map(|s| s / n as f64))
}

#[test]
fn synthetic_cts_on_real_anatomy_keep_organs_on_their_side() {
    let Some(dir) = common::shared_folder("data/btcv_labels") else { return };
    for (seed, case) in [(0u64, "0001.nii.gz"), (5, "0022.nii.gz")] {
        let anatomy = Arc::new(LabelAnatomy::read(&dir.join(case), Some("LAS")).unwrap());
        let p = generate_from(seed, &anatomy, &coarse());
        let x = |l: u8| centroid(&p, l).map(|c| c[0]);
        let (liver, spleen) = (x(label::LIVER).unwrap(), x(label::SPLEEN).unwrap());
        assert!(liver > spleen + 50.0, "{case}: liver x {liver:.0} not right of spleen x {spleen:.0}");
        if let (Some(r), Some(l)) = (x(label::RIGHT_KIDNEY), x(label::LEFT_KIDNEY)) {
            assert!(r > l, "{case}: right kidney x {r:.0} not right of the left one {l:.0}");
        }
        // The vertebral bodies sit behind the aorta: bone 32 mm posterior of its centre line,
        // within a few mm up or down (the discs between them are soft).
        let aorta = centroid(&p, label::AORTA).unwrap();
        let to_voxel = p.image.affine.inverse().unwrap();
        let bone = (-12..=12)
            .map(|dz| {
                let v = to_voxel.apply([aorta[0], aorta[1] - 32.0, aorta[2] + dz as f64]).map(|c| c.round() as usize);
                p.image.data[v[0] + p.image.dims[0] * (v[1] + p.image.dims[1] * v[2])]
            })
            .fold(f32::MIN, f32::max);
        assert!(bone > 150.0, "{case}: no bone behind the aorta ({bone} HU at most)");
        let same = generate_from(seed, &anatomy, &coarse());
        assert_eq!(p.image.data, same.image.data, "{case}: not deterministic");
        assert_eq!(p.labels, same.labels);
        let other = generate_from(seed + 1, &anatomy, &coarse());
        assert_ne!(p.labels, other.labels, "{case}: seeds do not vary the case");
        eprintln!("{case} seed {seed}: {:?} voxels, {}, aorta at {aorta:.0?}", p.image.dims, p.phase);
    }
}

#[test]
fn packed_bowel_fills_the_free_space_and_changes_nothing_else() {
    let Some(dir) = common::shared_folder("data/btcv_labels") else { return };
    let anatomy = Arc::new(LabelAnatomy::read(&dir.join("0003.nii.gz"), Some("LAS")).unwrap());
    for seed in [3u64, 4] {
        let packed = generate_from(seed, &anatomy, &coarse());
        let loops = generate_from(seed, &anatomy, &PhantomOptions { bowel: Bowel::Loops, ..coarse() });
        assert_eq!((packed.labels.as_slice(), packed.image.dims), (loops.labels.as_slice(), loops.image.dims));
        // Unlabelled voxels that are soft tissue or fluid (bowel, wall, muscle) or gas inside the
        // body: the packed bowel turns visceral fat into loops.
        let count = |p: &prosam_runtime::phantom::Phantom, range: std::ops::Range<f32>| {
            p.image.data.iter().zip(&p.labels).filter(|&(v, &l)| l == 0 && range.contains(v)).count()
        };
        let (soft_packed, soft_loops) = (count(&packed, -20.0..500.0), count(&loops, -20.0..500.0));
        let (fat_packed, fat_loops) = (count(&packed, -150.0..-60.0), count(&loops, -150.0..-60.0));
        eprintln!("seed {seed}: soft {soft_loops} -> {soft_packed}, fat {fat_loops} -> {fat_packed} voxels");
        assert!(soft_packed as f64 > 1.2 * soft_loops as f64 && fat_packed < fat_loops, "seed {seed}");
    }
}

#[test]
fn thin_fields_of_view_are_slabs_through_the_organs() {
    let Some(dir) = common::shared_folder("data/btcv_labels") else { return };
    let anatomy = Arc::new(LabelAnatomy::read(&dir.join("0004.nii.gz"), Some("LAS")).unwrap());
    for seed in 0..4u64 {
        let slab = generate_from(seed, &anatomy, &PhantomOptions { thin_fov: 1.0, ..coarse() });
        let whole = generate_from(seed, &anatomy, &PhantomOptions { thin_fov: 0.0, ..coarse() });
        let z_mm = |p: &prosam_runtime::phantom::Phantom| p.image.dims[2] as f64 * p.image.affine.spacing()[2];
        let organ_voxels = slab.labels.iter().filter(|&&l| l > 0).count();
        eprintln!(
            "seed {seed}: slab {:.0} mm ({organ_voxels} organ voxels), whole {:.0} mm",
            z_mm(&slab),
            z_mm(&whole)
        );
        assert!((36.0..=104.0).contains(&z_mm(&slab)) && organ_voxels > 1000, "seed {seed}");
        assert_eq!(slab.phase, whole.phase, "seed {seed}: the slab changed the rest of the case");
    }
}

#[test]
fn the_btcv_maps_read_as_stored_are_refused_as_mirrored() {
    let Some(dir) = common::shared_folder("data/btcv_labels") else { return };
    let path = dir.join("0001.nii.gz");
    let err = LabelAnatomy::read(&path, None).unwrap_err().to_string();
    assert!(err.contains("0001.nii.gz") && err.contains("LAS") && err.contains("left of the spleen"), "{err}");
}

/// Writes a uint8-valued float label map.
fn label_map(path: &Path, dims: [usize; 3], spacing: [f32; 3], fill: impl Fn(usize, usize, usize) -> f32) {
    let mut data = Vec::new();
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                data.push(fill(i, j, k));
            }
        }
    }
    let rows = [[spacing[0], 0.0, 0.0, 0.0], [0.0, spacing[1], 0.0, 0.0], [0.0, 0.0, spacing[2], 0.0]];
    common::write_nifti_f32(path, dims, &data, rows);
}

#[test]
fn bad_label_maps_are_clear_errors_naming_the_file() {
    let dir = common::scratch_dir("synthesis_bad_maps");
    // Liver on the right (high x in RAS), spleen on the left, aorta between: a valid minimal map.
    let organs = |i: usize, j: usize, k: usize| -> f32 {
        if !(8..24).contains(&k) || !(8..24).contains(&j) {
            0.0
        } else if i > 22 {
            6.0
        } else if i < 8 {
            1.0
        } else if (14..17).contains(&i) {
            8.0
        } else {
            0.0
        }
    };
    let good = dir.join("good.nii.gz");
    label_map(&good, [32, 32, 32], [2.0; 3], organs);
    LabelAnatomy::read(&good, None).unwrap();
    type Case<'a> = (&'a str, [usize; 3], [f32; 3], &'a dyn Fn(usize, usize, usize) -> f32, &'a str);
    let cases: [Case; 5] = [
        (
            "unknown.nii.gz",
            [32, 32, 32],
            [2.0; 3],
            &|i, j, k| if i == 3 && j == 4 && k == 5 { 17.0 } else { organs(i, j, k) },
            "17",
        ),
        ("empty.nii.gz", [32, 32, 32], [2.0; 3], &|_, _, _| 0.0, "no organ"),
        ("flat.nii.gz", [32, 32, 1], [2.0; 3], &|_, _, _| 6.0, "slice"),
        ("anisotropic.nii.gz", [32, 32, 32], [1.0, 1.0, 3.0], &organs, "anisotropic"),
        (
            "no_aorta.nii.gz",
            [32, 32, 32],
            [2.0; 3],
            &|i, j, k| if organs(i, j, k) == 8.0 { 0.0 } else { organs(i, j, k) },
            "aorta",
        ),
    ];
    for (name, dims, spacing, fill, needle) in cases {
        let path = dir.join(name);
        label_map(&path, dims, spacing, fill);
        let err = LabelAnatomy::read(&path, None).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
    // Through the CLI: the same error, and nothing written.
    let out = dir.join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["phantom", "--cases", "1", "--anatomy"])
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("anisotropic.nii.gz"), "{stderr}");
    assert!(!out.join("dataset.json").exists());
}

#[test]
fn the_cli_writes_a_dataset_with_held_out_anatomies_for_validation() {
    let Some(dir) = common::shared_folder("data/btcv_labels") else { return };
    let out = common::scratch_dir("synthesis_cli");
    let result = Command::new(env!("CARGO_BIN_EXE_prosam"))
        .args(["-q", "phantom", "--anatomy"])
        .arg(&dir)
        .args(["--anatomy-axes", "LAS", "--held-out", "0035,0036", "--cases", "3", "--validation", "1"])
        .args(["--in-plane", "4,4", "--slice", "4,4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(json["training"].as_array().unwrap().len(), 2);
    assert_eq!(json["validation"].as_array().unwrap().len(), 1);
    let image = out.join(json["validation"][0]["image"].as_str().unwrap());
    let header = std::fs::read(&image).unwrap();
    assert!(!header.is_empty());
    let described = prosam_runtime::volume::nifti::read(&image).unwrap().header.descrip;
    let text = String::from_utf8_lossy(&described);
    assert!(text.contains("0035") || text.contains("0036"), "validation case not on a held-out anatomy: {text}");
}
