//! Reading a state_dict from a PyTorch zip checkpoint (`torch.save`), bare or nested under a key.

use std::path::Path;

use candle_core::Tensor;
use candle_core::pickle::PthTensors;

use crate::{Error, Result};

/// Keys under which training scripts nest the state_dict, tried in this order after the top level.
pub const NESTED_STATE_DICT_KEYS: [&str; 4] = ["state_dict", "model", "network", "net"];

/// The state_dict of a PyTorch checkpoint, as `(key, tensor)` pairs in no particular order.
///
/// `looks_right` picks the dict that holds the model's weights among the top level and
/// [`NESTED_STATE_DICT_KEYS`], tried in that order; when none does, the first dict holding any
/// tensors is returned, for the caller to explain what it found.
pub fn read_state_dict(path: &Path, looks_right: impl Fn(&[&str]) -> bool) -> Result<Vec<(String, Tensor)>> {
    let fail = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        f.read_exact(&mut magic).map_err(|_| fail("the file is too short to be a checkpoint".into()))?;
    }
    if &magic != b"PK\x03\x04" {
        return Err(fail(
            "not a zip-format PyTorch checkpoint (legacy pickles are not supported: re-save it with torch.save from PyTorch >= 1.6)".into(),
        ));
    }
    let mut fallback: Option<PthTensors> = None;
    let mut chosen: Option<PthTensors> = None;
    for key in std::iter::once(None).chain(NESTED_STATE_DICT_KEYS.map(Some)) {
        let pth = match PthTensors::new(path, key) {
            Ok(p) => p,
            Err(e) if key.is_none() => return Err(fail(e.to_string())),
            Err(_) => continue,
        };
        let names: Vec<&str> = pth.tensor_infos().keys().map(String::as_str).collect();
        if names.is_empty() {
            continue;
        }
        if looks_right(&names) {
            chosen = Some(pth);
            break;
        }
        fallback.get_or_insert(pth);
    }
    let pth = chosen
        .or(fallback)
        .ok_or_else(|| fail(format!("no tensors found at the top level nor under {NESTED_STATE_DICT_KEYS:?}")))?;
    let mut out = Vec::with_capacity(pth.tensor_infos().len());
    for name in pth.tensor_infos().keys() {
        let t = pth
            .get(name)
            .map_err(|e| fail(format!("tensor `{name}`: {e}")))?
            .ok_or_else(|| fail(format!("tensor `{name}` is listed but cannot be read")))?;
        out.push((name.clone(), t));
    }
    Ok(out)
}
