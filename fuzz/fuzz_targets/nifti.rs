//! The NIfTI-1 reader on arbitrary bytes, plain or gzip-compressed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prosam_runtime::memory::admit_read;
use prosam_runtime::volume::nifti;

fuzz_target!(|data: &[u8]| {
    let admit = admit_read(prosam_fuzz::BUDGET);
    if let Ok(input) = nifti::read_from(std::io::Cursor::new(data), std::path::Path::new("fuzz.nii"), &admit) {
        assert_eq!(input.volume.data.len(), input.volume.dims.iter().product::<usize>());
    }
});
