//! Output files written whole or not at all: each is written to a temporary file in the target
//! folder, synced, and renamed over the destination, so a reader never sees a partial file.
//! Temporary files in flight are registered, so that an interrupted process (Ctrl-C) can remove
//! them; those of a process killed outright are removed by the next write in that folder.

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
    Ok(dir.join(format!("{}{}-{n}{suffix}", TEMP_PREFIXES[0], std::process::id())))
}

/// Prefixes of the files prosam makes beside its outputs, each followed by the writing process's
/// id: temporary outputs, and the write probe of `prosam segment`.
pub const TEMP_PREFIXES: [&str; 2] = [".prosam-tmp-", ".prosam-probe-"];

/// Whether process `pid` is alive, where that can be known (Linux `/proc`); elsewhere every
/// process counts as alive, so nothing of another run's is ever removed.
fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes from `dir` the temporary files of prosam processes that no longer run: what a run
/// killed while writing (SIGKILL, power loss) left behind. Files of live processes stay.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = TEMP_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else { continue };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else { continue };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Flushes a folder's entries to disk, so that a rename in it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Runs `write` on a temporary path beside `path`, then makes it durable and renames it to
/// `path`: a reader, or the next boot after a power cut, sees the old file or the new one, never
/// a part. On any error the temporary file is removed and the destination is left as it was.
/// Temporary files that killed runs left in the folder are removed first.
pub fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    let dir = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
    remove_stale(&dir);
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).push(tmp.clone());
    let result = write(&tmp).and_then(|()| {
        if !tmp.is_file() {
            return Err(std::io::Error::other(format!("the writer did not create {}", tmp.display())));
        }
        std::fs::OpenOptions::new().write(true).open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(&dir)
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
