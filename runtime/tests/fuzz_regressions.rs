//! Every input a fuzz target crashed on (fuzz/regressions/<target>/), replayed through the same
//! reader in the normal test build: each must now give an error or a value, never a panic, and
//! cost no more than a few hundred MiB.

mod common;

use std::path::Path;

use prosam_runtime::memory::{MemoryBudget, admit_read};
use prosam_runtime::volume::{dicom, nifti};

const BUDGET: MemoryBudget = MemoryBudget::new(64 << 20);

fn replay(target: &str, input: &Path, scratch: &Path) {
    let bytes = std::fs::read(input).unwrap();
    match target {
        "nifti" => {
            let _ = nifti::read_from(std::io::Cursor::new(&bytes), input, &admit_read(BUDGET));
        }
        "npy" => {
            let _ = prosam_runtime::npy::parse(&bytes);
        }
        "dicom" => {
            let folder = scratch.join("series");
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("slice.dcm"), &bytes).unwrap();
            if let Ok(scan) = dicom::scan(&folder) {
                for series in &scan.series {
                    let _ = series.geometry();
                    for slice in &series.slices {
                        assert!(slice.pixels_hu(BUDGET).is_err(), "{} decodes", input.display());
                    }
                }
            }
        }
        "checkpoint" => {
            assert!(prosam_models::format::import::import_monai(input, Default::default()).is_err());
        }
        "model_file" => {
            let _ = prosam_models::format::ModelFile::open(input);
        }
        other => panic!("fuzz/regressions/{other}: no replay for this target"),
    }
}

#[test]
fn crash_inputs_are_errors_now() {
    let root = common::workspace_root().join("fuzz/regressions");
    let scratch = common::scratch_dir("fuzz_regressions");
    let mut replayed = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().to_string();
        for input in std::fs::read_dir(&target).unwrap() {
            let input = input.unwrap().path();
            eprintln!("{name}: {}", input.display());
            let before = prosam_runtime::resources::peak_rss_mib();
            replay(&name, &input, &scratch);
            // Some of these once cost gigabytes (zero-filled declared lengths, oversized codestreams).
            if let (Some(a), Some(b)) = (before, prosam_runtime::resources::peak_rss_mib()) {
                assert!(b - a < 512.0, "{}: the peak RSS grew by {:.0} MiB", input.display(), b - a);
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression inputs under {}", root.display());
}
