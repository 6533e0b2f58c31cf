//! `prosam segment` killed with SIGKILL at random moments, often while it writes: the
//! destination holds nothing or a complete, valid label map, and the only temporary file ever
//! left is the killed run's own, which the next run removes. And the same input gives
//! byte-identical outputs across runs and thread counts.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prosam_runtime::volume::nifti;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn segment(model: &Path, ct: &Path, out: &Path, stats: &Path, threads: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prosam"));
    cmd.args(["--threads", threads, "--quiet", "segment", "-m", s(model), "-i", s(ct), "-o", s(out)])
        .args(["--stats", s(stats)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn run_to_end(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A small deterministic generator (xorshift), seeded from the clock and printed, so that a
/// failure can be replayed with PROSAM_KILL_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn sigkill_leaves_nothing_or_a_whole_file() {
    let dir = common::scratch_dir("crash_safety");
    let model = common::coarse_model(&dir);
    let ct = dir.join("ct.nii");
    common::blob_ct(&ct);
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("seg.nii.gz");
    let stats = out_dir.join("stats.json");

    let t0 = Instant::now();
    run_to_end(segment(&model, &ct, &out, &stats, "2"));
    let full = t0.elapsed();
    let want = nifti::read(&out).unwrap().volume.data;
    let want_stats = std::fs::read(&stats).unwrap();
    assert!(want.iter().any(|&l| l != want[0]), "a test that cannot fail: one label everywhere");

    let seed = std::env::var("PROSAM_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("PROSAM_KILL_SEED={seed}; a full run takes {full:?}");
    let mut rng = Rng(seed);
    // A write is a few milliseconds of a run, so the rounds that aim for it poll for the temporary
    // file and kill right after it appears; rounds go on until enough kills have provably landed
    // inside a write (the killed run's temporary file is still there), up to a cap.
    const WANT_INSIDE_WRITE: usize = 4;
    const MAX_ROUNDS: usize = 64;
    let (mut rounds, mut while_writing, mut left_behind) = (0, 0, 0);
    while rounds < 16 || (left_behind < WANT_INSIDE_WRITE && rounds < MAX_ROUNDS) {
        let round = rounds;
        rounds += 1;
        // Half the rounds start with no destination, half with a complete one from before.
        if round % 2 == 0 {
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(&stats);
        }
        let mut child = segment(&model, &ct, &out, &stats, "2").spawn().unwrap();
        let start = Instant::now();
        if round % 4 < 2 {
            // Anywhere in the run.
            std::thread::sleep(Duration::from_micros(rng.below(full.as_micros() as u64 * 5 / 4)));
        } else {
            // Once a temporary output exists, at once or a moment later: inside the write.
            while common::temp_files_in(&out_dir).is_empty() && start.elapsed() < full * 4 {
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(Duration::from_micros(rng.below(500)));
        }
        let writing = !common::temp_files_in(&out_dir).is_empty();
        kill(&mut child);
        while_writing += writing as usize;
        let temps = common::temp_files_in(&out_dir);
        assert!(temps.len() <= 1, "round {round}: more than the killed run's temporary file: {temps:?}");
        left_behind += temps.len();
        if out.exists() {
            let got = nifti::read(&out).unwrap_or_else(|e| panic!("round {round}: a broken destination: {e}"));
            assert_eq!(got.volume.data, want, "round {round}: the destination holds other labels");
        }
        if stats.exists() {
            assert_eq!(std::fs::read(&stats).unwrap(), want_stats, "round {round}: a partial stats file");
        }
    }
    eprintln!("{rounds} kills: {while_writing} while a temporary file existed, {left_behind} left one behind");
    assert!(
        left_behind >= WANT_INSIDE_WRITE,
        "only {left_behind} of {rounds} kills landed inside a write, too few to test anything"
    );

    // The next run removes what the killed ones left and writes the same file.
    run_to_end(segment(&model, &ct, &out, &stats, "2"));
    assert!(common::temp_files_in(&out_dir).is_empty(), "stale temporary files survived the next run");
    assert_eq!(nifti::read(&out).unwrap().volume.data, want);
}

#[test]
fn outputs_are_byte_identical_across_runs_and_thread_counts() {
    let dir = common::scratch_dir("determinism");
    let model = common::coarse_model(&dir);
    let ct = dir.join("ct.nii");
    common::blob_ct(&ct);
    let mut outputs = Vec::new();
    for (run, threads) in ["1", "2", "2", "1"].iter().enumerate() {
        let out = dir.join(format!("seg{run}.nii.gz"));
        let stats = dir.join(format!("stats{run}.json"));
        run_to_end(segment(&model, &ct, &out, &stats, threads));
        outputs.push((std::fs::read(&out).unwrap(), std::fs::read_to_string(&stats).unwrap()));
    }
    for (run, (seg, stats)) in outputs.iter().enumerate().skip(1) {
        assert!(seg == &outputs[0].0, "run {run}: the label map's bytes differ from run 0's");
        // The provenance names each run's own output; everything else must match.
        let strip = |text: &str, n: usize| text.replace(&format!("seg{n}.nii.gz"), "seg.nii.gz");
        assert_eq!(strip(stats, run), strip(&outputs[0].1, 0), "run {run}: the statistics differ");
    }
}
