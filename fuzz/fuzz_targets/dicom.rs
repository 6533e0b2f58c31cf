//! The DICOM reader on one arbitrary file in a folder: the scan, the series checks and the pixel
//! decoders (native, RLE, JPEG, JPEG 2000), each slice decoded on its own (a one-file series
//! cannot be a volume), under the fuzz budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prosam_runtime::volume::dicom;

fuzz_target!(|data: &[u8]| {
    prosam_fuzz::allow_caught_panics();
    let folder = prosam_fuzz::scratch().join("series");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("slice.dcm"), data).unwrap();
    let Ok(scan) = dicom::scan(&folder) else { return };
    for series in &scan.series {
        let _ = series.geometry();
        for slice in &series.slices {
            if let Ok(pixels) = slice.pixels_hu(prosam_fuzz::BUDGET) {
                assert_eq!(pixels.len(), slice.rows * slice.columns);
            }
        }
    }
});
