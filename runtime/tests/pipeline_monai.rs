//! The whole-volume pipeline against MONAI's (`../shared/fixtures/monai/ct_sm_fs12_*`): the
//! example CT through orientation, resampling, intensity window, sliding windows and back.

mod common;

use std::path::Path;

use prosam_models::format::Metadata;
use prosam_models::format::import::{MonaiOptions, import_monai};
use prosam_runtime::engine::{SegmentOptions, Segmenter};
use prosam_runtime::volume::nifti;

/// The fs 12 fixture converted with the BTCV defaults.
pub fn fixture_model(dir: &Path) -> Option<std::path::PathBuf> {
    let ckpt = common::shared_file("fixtures/monai/swinunetr_fs12.pt")?;
    let imported = import_monai(&ckpt, MonaiOptions::default()).unwrap();
    let metadata = Metadata::btcv("swinunetr_fs12", imported.config.clone());
    let path = dir.join("fs12.safetensors");
    prosam_models::format::save(&path, metadata, &imported.tensors).unwrap();
    Some(path)
}

#[test]
fn model_grid_input_and_labels_match_monai() {
    let dir = common::scratch_dir("pipeline_monai_grid");
    let (Some(model), Some(ct), Some(grid_fixture)) = (
        fixture_model(&dir),
        common::shared_file("data/example_ct_sm.nii.gz"),
        common::shared_file("fixtures/monai/ct_sm_fs12_model_grid.safetensors"),
    ) else {
        return;
    };
    let fixture = candle_core::safetensors::load(&grid_fixture, &candle_core::Device::Cpu).unwrap();
    let segmenter = Segmenter::load(&model, SegmentOptions::default()).unwrap();
    let input = nifti::read(&ct).unwrap();
    let grid = segmenter.preprocess(&input.volume).unwrap();
    let expected = &fixture["model_grid_input"];
    assert_eq!(grid.dims.to_vec(), expected.dims().to_vec(), "model grid shape");
    let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max_diff = grid.data.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("model grid input: max |diff| {max_diff:e}");
    assert!(max_diff <= 1e-4, "model-grid input differs by {max_diff}");

    // As `segment` runs: labels restored plane by plane while the windows finish them; the
    // planes are also kept whole to compare on the model grid.
    let (classes, voxels, plane_len) = (14, grid.dims.iter().product::<usize>(), grid.dims[1] * grid.dims[2]);
    let mut probs = vec![0f32; classes * voxels];
    let mut labels = vec![0u8; input.volume.dims.iter().product()];
    let mut restore = segmenter.label_restore(&grid, &mut labels);
    segmenter
        .probability_planes(&grid, &mut |_, _| true, &mut |x, plane| {
            for (c, values) in plane.chunks_exact(plane_len).enumerate() {
                probs[c * voxels + x * plane_len..c * voxels + (x + 1) * plane_len].copy_from_slice(values);
            }
            restore.push(x, plane);
        })
        .unwrap();
    restore.finish();
    let expected_labels = fixture["model_grid_labels"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let agree = (0..voxels)
        .filter(|&v| {
            let best = (0..classes)
                .max_by(|&a, &b| probs[a * voxels + v].total_cmp(&probs[b * voxels + v]).then(b.cmp(&a)))
                .unwrap();
            best as u8 == expected_labels[v]
        })
        .count();
    let rate = agree as f64 / voxels as f64;
    eprintln!("model grid labels: {:.4}% agree", rate * 100.0);
    assert!(rate >= 0.999, "model-grid labels agree on {:.4}% < 99.9%", rate * 100.0);

    assert!(labels == segmenter.restore(&grid, &probs), "restoring plane by plane differs from restoring whole");
    let (Some(final_fixture),) = (common::shared_file("fixtures/monai/ct_sm_fs12_labels.nii.gz"),) else { return };
    let expected = nifti::read(&final_fixture).unwrap();
    assert_eq!(expected.volume.dims, input.volume.dims);
    let agree = labels.iter().zip(&expected.volume.data).filter(|(a, b)| **a as f32 == **b).count();
    let rate = agree as f64 / labels.len() as f64;
    eprintln!("final labels: {:.4}% agree", rate * 100.0);
    assert!(rate >= 0.995, "final labels agree on {:.4}% < 99.5%", rate * 100.0);
}
