//! The C API's volume-descriptor validation: a descriptor from arbitrary bytes is checked, and
//! one that passes is gathered from a buffer exactly as large as the span it claims, so that the
//! address sanitizer catches any read the check did not bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prosam::{check_volume, gather, prosam_volume};

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|bytes: &[u8]| {
    let mut data = bytes;
    let i64s = |d: &mut &[u8]| i64::from_le_bytes(take::<8>(d));
    // Small sizes and strides most of the time, so that valid descriptors are common.
    let small = |v: i64| if v & (1 << 62) == 0 { v % 9 } else { v };
    let voxel_type = i32::from_le_bytes(take::<4>(&mut data)) % 6;
    let dims = [0; 3].map(|_| small(i64s(&mut data)));
    let strides = [0; 3].map(|_| small(i64s(&mut data)));
    let rescale_slope = f64::from_le_bytes(take::<8>(&mut data));
    let rescale_intercept = f64::from_le_bytes(take::<8>(&mut data));
    let mut affine = [0f64; 16];
    for (a, v) in affine.iter_mut().enumerate() {
        let raw = f64::from_le_bytes(take::<8>(&mut data));
        // Identity-like rows unless the input says otherwise, so that most affines invert.
        *v = if raw == 0.0 { [1.0, 0.0, 0.0, 0.0, 0.0][a % 5] } else { raw };
    }
    affine[12..].copy_from_slice(&[0.0, 0.0, 0.0, 1.0]);
    let affine_convention = i32::from_le_bytes(take::<4>(&mut data)) % 3;
    let placeholder = [0u8; 1];
    let mut volume = prosam_volume {
        data: placeholder.as_ptr().cast(),
        voxel_type,
        dims,
        strides,
        rescale_slope,
        rescale_intercept,
        affine,
        affine_convention,
    };
    let Ok(checked) = check_volume(&volume) else { return };
    let (low, high) = checked.span;
    let elements = (high - low + 1) as usize;
    if elements > 1 << 20 || checked.voxels() > 1 << 20 {
        return;
    }
    let buffer = vec![0u8; elements * checked.element_size()];
    volume.data = buffer.as_ptr().wrapping_offset(-low as isize * checked.element_size() as isize).cast();
    // SAFETY: `buffer` covers exactly the checked span's elements.
    let out = unsafe { gather(volume.data, &checked) }.expect("a volume of at most 2^20 voxels is allocated");
    assert_eq!(out.data.len(), checked.voxels());
});
