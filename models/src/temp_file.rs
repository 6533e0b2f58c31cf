//! Output files written whole or not at all: each is written to a temporary file in the target
//! folder and renamed over the destination, so a reader never sees a partial file. Temporary
//! files in flight are registered, so that an interrupted process (Ctrl-C) can remove them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The temporary sibling of `path`: hidden, named for this process, and ending in the same
/// extensions (`.nii.gz`, `.npy`), which some writers use to pick the format.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("the output path names no file (or not in UTF-8)"),
    })?;
    let suffix = name.char_indices().skip(1).find(|&(_, c)| c == '.').map_or("", |(i, _)| &name[i..]);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".prosam-tmp-{}-{n}{suffix}", std::process::id())))
}

/// Runs `write` on a temporary path beside `path`, then renames it to `path`. On any error the
/// temporary file is removed and the destination is left as it was.
pub fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).push(tmp.clone());
    let result = write(&tmp).and_then(|()| {
        if !tmp.is_file() {
            return Err(std::io::Error::other(format!("the writer did not create {}", tmp.display())));
        }
        std::fs::rename(&tmp, path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &tmp);
    result.map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Removes every temporary file still being written (for an interrupt handler).
pub fn remove_in_flight() {
    let files = std::mem::take(&mut *IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()));
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_keep_the_extensions_and_no_other_dot() {
        let t = temp_path(Path::new("/data/out/seg.v2.nii.gz")).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".prosam-tmp-") && name.ends_with(".v2.nii.gz"), "{name}");
        assert_eq!(t.parent().unwrap(), Path::new("/data/out"));
        assert!(temp_path(Path::new("logits.npy")).unwrap().to_str().unwrap().ends_with(".npy"));
    }

    #[test]
    fn failed_writes_leave_nothing() {
        let dir = std::env::temp_dir().join(format!("prosam-temp-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.bin");
        std::fs::write(&dest, b"old").unwrap();
        let err = write_via_temp(&dest, |tmp| {
            std::fs::write(tmp, b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "the temporary file was removed");
        write_via_temp(&dest, |tmp| std::fs::write(tmp, b"new")).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
