//! The model file loader on arbitrary bytes: the safetensors header, the prosam metadata, the
//! checksum, the weight checks and the network built from them.
//!
//! Two helps for the fuzzer, so that it gets past what it cannot forge: a data section shorter
//! than the header's offsets is padded with zeros (seeds can then be headers alone), and when the
//! metadata parses, the file is re-saved with its true checksum before it is opened.
#![no_main]

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use prosam_models::format::{self, Metadata, ModelFile};

/// The largest data section padded out; beyond it the input is opened as it is.
const MAX_DATA: u64 = 64 << 20;

fn padded(data: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let header: serde_json::Value = serde_json::from_slice(data.get(8..8usize.checked_add(n as usize)?)?).ok()?;
    let end = header.as_object()?.values().filter_map(|v| v.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0);
    let total = 8 + n + end;
    if end > MAX_DATA || (data.len() as u64) >= total {
        return None;
    }
    let mut out = data.to_vec();
    out.resize(total as usize, 0);
    Some(out)
}

/// The file's tensors and metadata, re-saved so that the checksum holds.
fn resaved(bytes: &[u8], path: &std::path::Path) -> Option<()> {
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let metadata: Metadata = serde_json::from_str(header.metadata().as_ref()?.get(format::METADATA_KEY)?).ok()?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = DType::try_from(view.dtype()).ok()?;
        tensors.push((name, Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).ok()?));
    }
    format::save(path, metadata, &tensors).ok().map(|_| ())
}

fuzz_target!(|data: &[u8]| {
    let path = prosam_fuzz::scratch().join("model.safetensors");
    let bytes = padded(data).unwrap_or_else(|| data.to_vec());
    if resaved(&bytes, &path).is_none() {
        std::fs::write(&path, &bytes).unwrap();
    }
    if let Ok(file) = ModelFile::open(&path) {
        let _ = file.swin_unetr(DType::F32, &Device::Cpu);
    }
});
