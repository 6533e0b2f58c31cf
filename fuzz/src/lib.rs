//! What the fuzz targets share: a scratch folder per process for the parsers that read from a
//! path, and the memory budget they run under.

use std::path::PathBuf;

/// The budget every target reads under: far above any seed, far below libFuzzer's 2 GiB limit.
pub const BUDGET: prosam_runtime::memory::MemoryBudget = prosam_runtime::memory::MemoryBudget::new(64 << 20);

/// A folder of this process's own (parallel fuzzing jobs do not share files), made on first use;
/// in memory (/dev/shm) where there is one, since the writers sync every file they write.
pub fn scratch() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let dir = base.join(format!("prosam-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Makes caught panics quiet and harmless: libfuzzer-sys's hook aborts on every panic, even one
/// that prosam catches on purpose (around third-party pixel decoders). A panic that escapes
/// still reaches libfuzzer-sys's own `catch_unwind`, which aborts and reports the crash.
pub fn allow_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}
