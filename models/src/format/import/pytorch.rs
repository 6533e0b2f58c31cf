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
    let entry_sizes = open_checked(path)?;
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
    tensors_of(&pth, &entry_sizes, path)
}

/// The dict stored under the top-level key `key` (as a training script saves `encoder_dict`
/// beside `decoder_dict`), or `None` when the file has no such key or it holds no tensors.
pub fn read_state_dict_at(path: &Path, key: &str) -> Result<Option<Vec<(String, Tensor)>>> {
    let entry_sizes = open_checked(path)?;
    match PthTensors::new(path, Some(key)) {
        Ok(pth) if !pth.tensor_infos().is_empty() => Ok(Some(tensors_of(&pth, &entry_sizes, path)?)),
        _ => Ok(None),
    }
}

/// Checks the zip magic and the archive (see [`check_archive`]); returns every entry's size.
fn open_checked(path: &Path) -> Result<std::collections::HashMap<String, u64>> {
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
    check_archive(path).map_err(fail)
}

/// Every tensor of `pth`, after checking that each fits in its storage entry.
fn tensors_of(
    pth: &PthTensors,
    entry_sizes: &std::collections::HashMap<String, u64>,
    path: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let fail = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    for (name, info) in pth.tensor_infos() {
        let claimed = info
            .layout
            .shape()
            .elem_count()
            .checked_add(info.layout.start_offset())
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()));
        let stored = entry_sizes.get(&info.path).copied().unwrap_or(0);
        if claimed.is_none_or(|c| c as u64 > stored) {
            return Err(fail(format!(
                "tensor `{name}` claims {:?} of {:?}, more than its storage `{}` holds ({stored} bytes)",
                info.layout.shape().dims(),
                info.dtype,
                info.path
            )));
        }
    }
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

/// The largest pickle read: a state_dict's pickle holds names and shapes, a few MB at most.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Checks what candle's unpickler would otherwise trust, and returns every entry's size: candle
/// allocates a string's declared length (up to 4 GiB) before reading it, and a tensor's declared
/// size before finding its storage short.
fn check_archive(path: &Path) -> std::result::Result<std::collections::HashMap<String, u64>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| format!("not a readable zip: {e}"))?;
    let mut sizes = std::collections::HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry.name().map_err(|e| format!("zip entry {i}: {e}"))?.to_string();
        sizes.insert(name.clone(), entry.size());
        if !name.ends_with("data.pkl") {
            continue;
        }
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!("{name} is {} bytes, more than a state_dict's pickle holds", entry.size()));
        }
        let mut pickle = Vec::new();
        (&mut entry).take(MAX_PICKLE_BYTES).read_to_end(&mut pickle).map_err(|e| format!("{name}: {e}"))?;
        check_pickle(&pickle).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(sizes)
}

/// Walks the opcodes candle's unpickler reads, checking every length against the bytes that
/// remain. Stops at STOP or at an opcode candle does not know (it rejects those itself).
fn check_pickle(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut at = 0usize;
    let arg = |at: usize, n: usize| bytes.get(at + 1..at + 1 + n).ok_or_else(|| format!("truncated at byte {at}"));
    while at < bytes.len() {
        let op = bytes[at];
        let width = match op {
            b'.' => return Ok(()),
            b'X' => {
                let len = u32::from_le_bytes(arg(at, 4)?.try_into().expect("4 bytes")) as usize;
                if len > bytes.len() - at - 5 {
                    return Err(format!("a string at byte {at} claims {len} bytes, past the end of the pickle"));
                }
                4 + len
            }
            b'c' => {
                let rest = &bytes[at + 1..];
                let first = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
                let second = rest[first + 1..].iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
                first + second + 2
            }
            0x8a => {
                let n = arg(at, 1)?[0] as usize;
                if n > 8 {
                    return Err(format!("a {n}-byte integer at byte {at}; candle reads at most 8"));
                }
                1 + n
            }
            0x80 | b'q' | b'K' | b'h' => 1,
            b'M' => 2,
            b'r' | b'J' | b'j' => 4,
            b'G' => 8,
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | 0x85..=0x89
            | b'N'
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | 0x81
            | b']'
            | b'a'
            | b'e' => 0,
            _ => return Ok(()),
        };
        if at + 1 + width > bytes.len() {
            return Err(format!("truncated at byte {at}"));
        }
        at += 1 + width;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_pickle;

    #[test]
    fn pickle_lengths_are_checked_against_the_pickle() {
        // PROTO 2, BINUNICODE of 3 bytes, STOP.
        assert!(check_pickle(b"\x80\x02X\x03\x00\x00\x00abc.").is_ok());
        // Found by the fuzzer: a string claiming 4 GiB, which candle would allocate first.
        let err = check_pickle(b"\x80\x02X\xff\xff\xff\xffabc.").unwrap_err();
        assert!(err.contains("past the end"), "{err}");
        assert!(check_pickle(b"\x80\x02\x8a\x09\x01").unwrap_err().contains("9-byte integer"));
        assert!(check_pickle(b"\x80\x02ctorch\n").unwrap_err().contains("GLOBAL"));
        assert!(check_pickle(b"\x80").unwrap_err().contains("truncated"));
    }
}
