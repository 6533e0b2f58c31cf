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

/// The most objects candle's unpickler may build for one pickle: a state_dict of thousands of
/// tensors makes tens of thousands; each object costs candle 50 to 100 bytes.
pub const MAX_PICKLE_OBJECTS: u64 = 4_000_000;

/// The deepest nesting of objects: a state_dict nests about six deep. Candle reads and drops
/// objects recursively, so a deeper one would overflow the stack.
pub const MAX_PICKLE_DEPTH: u32 = 200;

/// What candle's unpickler would hold for one stack entry: how many objects, how deeply nested.
#[derive(Debug, Clone, Copy)]
struct Held {
    objects: u64,
    depth: u32,
    mark: bool,
}

impl Held {
    const LEAF: Held = Held { objects: 1, depth: 1, mark: false };

    /// A container of `parts`.
    fn of(parts: &[Held]) -> Held {
        Held {
            objects: parts.iter().map(|p| p.objects).fold(1, u64::saturating_add),
            depth: parts.iter().map(|p| p.depth).max().unwrap_or(0) + 1,
            mark: false,
        }
    }

    /// `self` with `parts` added to it (APPEND, SETITEMS, ...).
    fn extended(self, parts: &[Held]) -> Held {
        let more = Held::of(parts);
        Held { objects: self.objects.saturating_add(more.objects - 1), depth: self.depth.max(more.depth), mark: false }
    }
}

/// Runs the opcodes candle's unpickler reads on sizes instead of objects, before candle does:
/// every length is checked against the bytes that remain, and the objects candle would build
/// (memo entries are copied on every get and put) are counted and their nesting measured,
/// within [`MAX_PICKLE_OBJECTS`] and [`MAX_PICKLE_DEPTH`]. Stops at STOP, and where candle
/// would stop with an error of its own (an unknown opcode, a missing memo entry, an empty stack).
fn check_pickle(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut at = 0usize;
    let arg = |at: usize, n: usize| bytes.get(at + 1..at + 1 + n).ok_or_else(|| format!("truncated at byte {at}"));
    let mut stack: Vec<Held> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Held> = std::collections::HashMap::new();
    let mut built = 0u64;
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
        let memo_key = |w: usize| -> u32 {
            let b = &bytes[at + 1..at + 1 + w];
            if w == 1 { b[0] as u32 } else { u32::from_le_bytes(b.try_into().expect("4 bytes")) }
        };
        // The stack entries an opcode takes: the top `n`, or those above the last mark.
        let pop = |stack: &mut Vec<Held>, n: usize| stack.len().checked_sub(n).map(|from| stack.split_off(from));
        let to_mark = |stack: &mut Vec<Held>| {
            let mark = stack.iter().rposition(|h| h.mark)?;
            let parts = stack.split_off(mark + 1);
            stack.pop();
            Some(parts)
        };
        let pushed = match op {
            0x80 => None,
            b'(' => Some(Held { objects: 1, depth: 0, mark: true }),
            b'X' | b'c' | 0x8a | b'K' | b'M' | b'J' | b'G' | b')' | b'N' | 0x88 | 0x89 | b'}' | b'd' | b']' => {
                Some(Held::LEAF)
            }
            b'h' | b'j' => match memo.get(&memo_key(width)) {
                Some(&held) => Some(held),
                None => return Ok(()),
            },
            b'q' | b'r' => match stack.last() {
                Some(&top) => {
                    built = built.saturating_add(top.objects);
                    memo.insert(memo_key(width), top);
                    None
                }
                None => return Ok(()),
            },
            b'Q' | 0x85 | 0x86 | 0x87 | b'R' | 0x81 | b'b' => {
                let n = match op {
                    b'Q' | 0x85 => 1,
                    0x86 | b'R' | 0x81 | b'b' => 2,
                    _ => 3,
                };
                match pop(&mut stack, n) {
                    Some(parts) => Some(Held::of(&parts)),
                    None => return Ok(()),
                }
            }
            b't' => match to_mark(&mut stack) {
                Some(parts) => Some(Held::of(&parts)),
                None => return Ok(()),
            },
            b'a' | b's' | b'e' | b'u' => {
                let parts = match op {
                    b'a' => pop(&mut stack, 1),
                    b's' => pop(&mut stack, 2),
                    _ => to_mark(&mut stack),
                };
                match (parts, stack.pop()) {
                    (Some(parts), Some(container)) => Some(container.extended(&parts)),
                    _ => return Ok(()),
                }
            }
            _ => unreachable!("every opcode above has its effect"),
        };
        if let Some(held) = pushed {
            if held.depth > MAX_PICKLE_DEPTH {
                return Err(format!(
                    "objects nest {} deep at byte {at}, deeper than a state_dict's {MAX_PICKLE_DEPTH}",
                    held.depth
                ));
            }
            if matches!(op, b'h' | b'j') {
                built = built.saturating_add(held.objects);
            } else {
                built = built.saturating_add(1);
            }
            stack.push(held);
        }
        if built > MAX_PICKLE_OBJECTS {
            return Err(format!(
                "unpickling would build more than {MAX_PICKLE_OBJECTS} objects by byte {at} (memo references \
                 copied over and over, or a flood of objects): not a state_dict"
            ));
        }
        at += 1 + width;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn pickle_objects_are_counted_and_their_nesting_bounded() {
        // A dict of two string -> tuple entries, as state_dicts are made: well within bounds.
        assert!(check_pickle(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01K\x02\x86X\x01\x00\x00\x00bh\x00\x85u.").is_ok());
        // A memo entry that holds two copies of the previous one, 30 times over: 2^30 objects.
        let mut bomb = b"\x80\x02N".to_vec();
        for level in 0u8..30 {
            bomb.extend([b'q', level, b'h', level, 0x86]);
        }
        bomb.push(b'.');
        assert!(check_pickle(&bomb).unwrap_err().contains("objects"));
        // Nesting one past the bound is refused; at the bound it is not.
        let nested = |n: usize| [&b"\x80\x02N"[..], &vec![0x85u8; n], b"."].concat();
        assert!(check_pickle(&nested(MAX_PICKLE_DEPTH as usize - 1)).is_ok());
        assert!(check_pickle(&nested(MAX_PICKLE_DEPTH as usize)).unwrap_err().contains("nest"));
        // The same bounds hold through marks: a tuple of marks' contents.
        let marks = [&b"\x80\x02"[..], &vec![b'('; 300], b"N", &vec![b't'; 300], b"."].concat();
        assert!(check_pickle(&marks).unwrap_err().contains("nest"));
    }
}
