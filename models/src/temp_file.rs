//! Output files written whole or not at all: each is written to a temporary file in the target
//! folder, synced, and renamed over the destination, so a reader never sees a partial file.
//! Temporary files in flight are registered, so that an interrupted process (Ctrl-C) can remove
//! them, and held locked (`flock`) while they are written: one that no process holds locked is
//! what a killed run left, and the next write in that folder removes it. A lock, not a process
//! id: a run in another PID namespace (another container on the same volume) is not visible in
//! this one's `/proc`, but its lock is.
//!
//! Only regular files are outputs: a destination that exists as anything else (a device node, a
//! FIFO, a socket, a folder) is refused, never replaced by the rename.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{Error, Result};

static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Prefixes of the files prosam makes beside its outputs, each followed by the writing process's
/// id: temporary outputs (locked from the moment they have this name), files being created
/// (renamed to a temporary output's name once locked), and write probes.
pub const TEMP_PREFIXES: [&str; 3] = [".prosam-tmp-", ".prosam-new-", ".prosam-probe-"];

/// How old an unlocked file being created, or a probe, must be before another run removes it:
/// each lives for a moment, unlocked (a probe) or not yet locked.
const STALE_AFTER: Duration = Duration::from_secs(2);

fn io_error(path: &Path, text: String) -> Error {
    Error::Io { path: path.to_path_buf(), source: std::io::Error::other(text) }
}

/// The temporary sibling of `path` with prefix `prefix` and counter `n`: hidden, named for this
/// process, and ending in the same extensions (`.nii.gz`, `.npy`), which some writers use to pick
/// the format. File names need not be UTF-8.
fn sibling(path: &Path, prefix: &str, n: usize) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| io_error(path, "the output path names no file".into()))?;
    let bytes = name.as_encoded_bytes();
    let dot = bytes.iter().skip(1).position(|&b| b == b'.').map(|i| i + 1);
    let mut temp = OsString::from(format!("{prefix}{}-{n}", std::process::id()));
    if let Some(dot) = dot {
        // SAFETY: split at an ASCII '.', which keeps both halves valid encoded OS strings.
        temp.push(unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(&bytes[dot..]) });
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(dir.join(temp))
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    sibling(path, TEMP_PREFIXES[0], COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Checks an output path before any work: it is none of `inputs` (an input is never
/// overwritten, whatever path spells it) and [`check_writable`].
pub fn check_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    let canonical_out = output.parent().and_then(|p| {
        let dir = if p.as_os_str().is_empty() { Path::new(".") } else { p };
        dir.canonicalize().ok().map(|d| d.join(output.file_name().unwrap_or_default()))
    });
    for input in inputs {
        let same = match (&canonical_out, input.canonicalize()) {
            (Some(o), Ok(i)) => *o == i,
            _ => output == *input,
        };
        if same {
            return Err(io_error(output, format!("is the input {}: refusing to overwrite an input", input.display())));
        }
    }
    check_writable(output)
}

/// Refuses a destination that exists and is not a regular file: the rename would replace a
/// device node, a FIFO or a socket (system-wide, for one in /dev), and a folder is no file.
pub fn check_destination(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(io_error(path, "is a folder, not a file".into())),
        Ok(m) if !m.is_file() => Err(io_error(
            path,
            "exists and is not a regular file (a device, FIFO or socket); prosam writes its outputs as regular files \
             only, and would replace this one"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Checks, before any work, that `path` can be written: not an existing non-file
/// ([`check_destination`]), in a folder that exists, where a file with the longest temporary name
/// prosam would use can be made (so a name too long for its temporary sibling, a read-only
/// folder or a full inode table shows now, not after minutes of work).
pub fn check_writable(path: &Path) -> Result<()> {
    check_destination(path)?;
    let probe = sibling(path, TEMP_PREFIXES[2], usize::MAX)?;
    let dir = probe.parent().map(Path::to_path_buf).unwrap_or_default();
    if !dir.is_dir() {
        return Err(io_error(path, format!("the output folder {} does not exist", dir.display())));
    }
    File::create_new(&probe).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Removes from `dir` the temporary files that no process holds locked: what a run killed while
/// writing (SIGKILL, power loss) left behind. Files being created and probes are removed only
/// once older than [`STALE_AFTER`].
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(kind) = TEMP_PREFIXES.iter().position(|p| name.as_encoded_bytes().starts_with(p.as_bytes())) else {
            continue;
        };
        let Ok(file) = File::open(entry.path()) else { continue };
        let fresh =
            || file.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a < STALE_AFTER));
        if (kind == 0 || !fresh()) && file.try_lock().is_ok() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Flushes a folder's entries to disk, so that a rename in it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Runs `write` on a temporary path beside `path`, then makes it durable and renames it to
/// `path`: a reader, or the next boot after a power cut, sees the old file or the new one, never
/// a part. The temporary file exists, locked, before `write` runs (which may open it by its path
/// again, or replace it). On any error it is removed and the destination left as it was.
/// Temporary files that killed runs left in the folder are removed first. A destination that is
/// not a regular file is refused ([`check_destination`]).
pub fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    check_destination(path)?;
    let tmp = temp_path(path)?;
    let dir = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
    remove_stale(&dir);
    // Created and locked under a staging name, then renamed (the lock stays with the file): a file
    // with a temporary output's name is locked from its first moment, so another run's clean-up
    // can judge it by its lock alone. Held until the rename onto `path`.
    let staging = sibling(path, TEMP_PREFIXES[1], COUNTER.fetch_add(1, Ordering::Relaxed))?;
    let held = File::create_new(&staging).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    // Where the file system has no locks, the file goes unlocked and no run's clean-up can lock
    // it either, so none removes it.
    let _ = held.lock();
    if let Err(source) = std::fs::rename(&staging, &tmp) {
        let _ = std::fs::remove_file(&staging);
        return Err(Error::Io { path: path.to_path_buf(), source });
    }
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
    drop(held);
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
