//! The .npy reader on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = prosam_runtime::npy::parse(data) {
        assert_eq!(array.data.len(), array.shape.iter().product::<usize>());
    }
});
