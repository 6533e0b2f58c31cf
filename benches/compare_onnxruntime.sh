#!/usr/bin/env bash
# One 96^3 SwinUNETR window: prosam against ONNX Runtime, alternating in one run on one machine.
#
#   benches/compare_onnxruntime.sh [ROUNDS]       (default 3 rounds; THREADS=2, RUNS=5 per round)
#
# Each round runs ONNX Runtime on the MONAI export of the fs 12 fixture network, then `prosam bench`
# on the same network in f32 and int8, and on random-weight fs 24 students (f32, int8; latency
# does not depend on the weights; there is no fs 24 ONNX file to compare with). Every tool gets
# THREADS intra-op threads (ONNX Runtime: 1 inter-op thread, all graph optimisations), the same
# window size and a warm-up run. The table gives median, min and max over all rounds' runs and
# each median's ratio to ONNX Runtime's. ONNX Runtime comes from PyPI into a virtual environment
# under target/ (made on first use). A benchmark, not a test: it is not part of CI.
#
# WHOLE_VOLUME=ct.nii.gz adds `prosam segment` of that CT with the fs 12 network to every round,
# timed from start to written labels, and a second table: its wall time against the number of
# windows times ONNX Runtime's median window of the same run, and its peak RSS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-3}
threads=${THREADS:-2}
runs=${RUNS:-5}
shared=${PROSAM_SHARED:-$root/../shared}
onnx=$shared/fixtures/monai/swinunetr_fs12_96.onnx
checkpoint=$shared/fixtures/monai/swinunetr_fs12.pt
for f in "$onnx" "$checkpoint"; do
  [ -f "$f" ] || { echo "missing $f (set PROSAM_SHARED to the shared folder)" >&2; exit 1; }
done

venv=$root/target/ort-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import onnxruntime, numpy' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet onnxruntime numpy
fi

cd "$root"
cargo build --release --quiet -p prosam-runtime
cargo build --release --quiet --example random_student
prosam="$root/target/release/prosam --threads $threads --quiet"
models=$root/target/bench-models
mkdir -p "$models"
[ -f "$models/fs12_f32.safetensors" ] || $prosam convert --monai "$checkpoint" -o "$models/fs12_f32.safetensors"
[ -f "$models/fs24_f32.safetensors" ] || "$root/target/release/examples/random_student" 24 "$models/fs24_f32.safetensors"
for fs in 12 24; do
  [ -f "$models/fs${fs}_int8.safetensors" ] ||
    $prosam quantize -m "$models/fs${fs}_f32.safetensors" --to int8 -o "$models/fs${fs}_int8.safetensors"
done

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  "$venv/bin/python" "$root/benches/onnxruntime_forward.py" --model "$onnx" --threads "$threads" --runs "$runs" \
    >>"$results/onnxruntime_fs12_f32.jsonl"
  for model in fs12_f32 fs12_int8 fs24_f32 fs24_int8; do
    $prosam bench -m "$models/$model.safetensors" --runs "$runs" --json | tr -d '\n' >>"$results/prosam_$model.jsonl"
    echo >>"$results/prosam_$model.jsonl"
  done
  if [ -n "${WHOLE_VOLUME:-}" ]; then
    start=$(date +%s.%N)
    $prosam segment -m "$models/fs12_f32.safetensors" -i "$WHOLE_VOLUME" -o "$results/labels.nii.gz" --json \
      | tr -d '\n' >"$results/segment.json"
    end=$(date +%s.%N)
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); r["wall_s"] = float(sys.argv[3]) - float(sys.argv[2]); print(json.dumps(r))' \
      "$results/segment.json" "$start" "$end" >>"$results/segment.jsonl"
  fi
done

python3 - "$results" "$threads" <<'EOF'
import json, os, statistics, sys
results, threads = sys.argv[1], sys.argv[2]
rows = {}
for name in ["onnxruntime_fs12_f32", "prosam_fs12_f32", "prosam_fs12_int8", "prosam_fs24_f32", "prosam_fs24_int8"]:
    times, rss = [], 0.0
    with open(os.path.join(results, name + ".jsonl")) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                times += record["times_s"]
                rss = max(rss, record.get("peak_rss_mib") or 0.0)
    rows[name] = (statistics.median(times), min(times), max(times), len(times), rss)
ort = rows["onnxruntime_fs12_f32"][0]
print(f"one 96^3 window, {threads} threads, same run")
print(f"| {'runtime, network, precision':<32} | median s | min s | max s | runs | vs ONNX Runtime fs 12 | peak RSS MiB |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, (med, lo, hi, n, rss) in rows.items():
    label = name.replace("_", " ").replace("fs12", "fs 12").replace("fs24", "fs 24")
    print(f"| {label:<32} | {med:.3f} | {lo:.3f} | {hi:.3f} | {n} | {med / ort:.2f}x | {rss:.0f} |")
segments = os.path.join(results, "segment.jsonl")
if os.path.exists(segments):
    records = [json.loads(line) for line in open(segments) if line.strip()]
    walls = [r["wall_s"] for r in records]
    windows = records[0]["windows"]
    dims = "x".join(str(d) for d in records[0]["dims"])
    med = statistics.median(walls)
    print()
    print(f"whole volume ({dims}, prosam segment, fs 12 f32), {threads} threads, same run")
    print("| median s | min s | max s | runs | windows | windows x ONNX Runtime median s | ratio | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rss = max(r.get("peak_rss_mib") or 0.0 for r in records)
    print(f"| {med:.1f} | {min(walls):.1f} | {max(walls):.1f} | {len(walls)} | {windows} | {windows * ort:.1f} | {med / (windows * ort):.2f}x | {rss:.0f} |")
    stages = {k: statistics.median(r["times_s"][k] for r in records) for k in records[0]["times_s"]}
    print("stages (median s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
EOF
