//! The memory budget: headers that claim more than it allows are refused before anything is
//! allocated, decompression stops at what the header declares, and the estimate behind the
//! budget bounds what a real run holds.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use prosam_runtime::memory::{MemoryBudget, admit_read};
use prosam_runtime::volume::{dicom, nifti};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prosam(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prosam")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A NIfTI-1 header (int16, 1 mm, sform) for `dims`, followed by `data`.
fn nifti_bytes(dims: [u16; 3], data: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let dim: [i16; 8] = [3, dims[0] as i16, dims[1] as i16, dims[2] as i16, 1, 1, 1, 1];
    for (i, d) in dim.iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&4i16.to_le_bytes()); // int16
    h[72..74].copy_from_slice(&16i16.to_le_bytes());
    for (i, p) in [1f32, 1.0, 1.0, 1.0].iter().enumerate() {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&p.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes());
    h[254..256].copy_from_slice(&1i16.to_le_bytes()); // sform_code
    for (row, at) in [(0, 280), (1, 296), (2, 312)] {
        let mut r = [0f32; 4];
        r[row] = 1.0;
        for (i, v) in r.iter().enumerate() {
            h[at + 4 * i..at + 4 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    h.extend_from_slice(data);
    h
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn impossible_headers_are_refused_before_allocating() {
    let dir = common::scratch_dir("memory_budget_headers");
    let model = common::coarse_model(&dir);
    // 65535^3 int16 voxels: 512 TiB claimed by a 352-byte file (plain and compressed).
    let huge = dir.join("huge.nii");
    std::fs::write(&huge, nifti_bytes([65535; 3], &[])).unwrap();
    let huge_gz = dir.join("huge.nii.gz");
    std::fs::write(&huge_gz, gzip(&nifti_bytes([65535; 3], &[]))).unwrap();
    for input in [&huge, &huge_gz] {
        let t = Instant::now();
        let out = dir.join("seg.nii.gz");
        let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(input), "-o", s(&out), "--quiet"]);
        assert!(!ok && !out.exists(), "{err}");
        for needle in [input.file_name().unwrap().to_str().unwrap(), "65535 x 65535 x 65535", "PiB", "memory budget"] {
            assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
        }
        assert!(t.elapsed().as_secs() < 20, "refusing took {:?}", t.elapsed());
        // The reader alone, under the machine's memory, refuses it too.
        let e = nifti::read(input).unwrap_err().to_string();
        assert!(e.contains("memory budget"), "{e}");
    }

    // An explicit budget below what a real CT needs.
    let ct = dir.join("ct.nii.gz");
    std::fs::write(&ct, gzip(&nifti_bytes([64, 64, 32], &vec![0u8; 64 * 64 * 32 * 2]))).unwrap();
    let out = dir.join("seg.nii.gz");
    let (ok, _, err) =
        prosam(&["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "--quiet", "--max-memory", "20M"]);
    assert!(!ok && err.contains("20.00 MiB") && err.contains("64 x 64 x 32"), "{err}");
    let (ok, _, err) = prosam(&["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "--max-memory", "lots"]);
    assert!(!ok && err.contains("--max-memory") && err.contains("lots"), "{err}");
    let (ok, _, err) =
        prosam(&["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&out), "--quiet", "--max-memory", "2G"]);
    assert!(ok, "{err}");
}

#[test]
fn decompression_stops_at_the_declared_voxels() {
    // A 4 x 4 x 4 header followed by 256 MiB of zeros (a 1 MiB gzip stream): only the 128
    // declared bytes are inflated.
    let mut zeros = nifti_bytes([4, 4, 4], &[]);
    zeros.resize(zeros.len() + (256 << 20), 0);
    let bomb = gzip(&zeros);
    drop(zeros);
    assert!(bomb.len() < 2 << 20);
    let t = Instant::now();
    let before = prosam_runtime::resources::peak_rss_mib();
    let input = nifti::read_from(
        std::io::Cursor::new(&bomb),
        Path::new("bomb.nii.gz"),
        &admit_read(MemoryBudget::new(1 << 20)),
    )
    .unwrap();
    assert_eq!(input.volume.dims, [4, 4, 4]);
    assert!(t.elapsed().as_millis() < 500, "inflated more than the header declares: {:?}", t.elapsed());
    if let (Some(a), Some(b)) = (before, prosam_runtime::resources::peak_rss_mib()) {
        assert!(b - a < 64.0, "peak RSS grew by {} MiB", b - a);
    }
}

#[test]
fn dicom_series_are_checked_before_their_pixels_are_decoded() {
    let Some(series) = common::shared_folder("data/example_ct_dicom") else { return };
    let t = Instant::now();
    let err = dicom::read_admitting(&series, None, &admit_read(MemoryBudget::new(1 << 20))).unwrap_err().to_string();
    assert!(err.contains("512 x 512 x 20") && err.contains("1.00 MiB") && err.contains("memory budget"), "{err}");
    assert!(t.elapsed().as_secs() < 10);
    assert!(dicom::read_admitting(&series, None, &admit_read(MemoryBudget::new(1 << 30))).is_ok());
}

#[test]
fn the_estimate_bounds_the_peak_of_a_real_run() {
    let dir = common::scratch_dir("memory_budget_estimate");
    let model = common::coarse_model(&dir);
    // The CT's own grid dominates here (reading, restoring, cleaning).
    let ct = dir.join("ct.nii");
    common::blob_ct(&ct);
    let out = dir.join("seg.nii.gz");
    let (ok, stdout, err) = prosam(&[
        "--threads",
        "2",
        "segment",
        "-m",
        s(&model),
        "-i",
        s(&ct),
        "-o",
        s(&out),
        "--quiet",
        "--json",
        "--postprocess",
        "all",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let peak = summary["peak_rss_mib"].as_f64().unwrap();
    let estimate = summary["memory_estimate_mib"].as_f64().unwrap();
    eprintln!("peak RSS {peak:.0} MiB, estimate {estimate:.0} MiB");
    assert!(peak <= estimate, "the run peaked at {peak:.0} MiB, over its {estimate:.0} MiB estimate");
    assert!(estimate <= 4.0 * peak, "an estimate of {estimate:.0} MiB for a {peak:.0} MiB run refuses runs that fit");
}
