#!/usr/bin/env bash
# One 96^3 SwinUNETR window: ONNX Runtime on the MONAI export, then prosam's criterion benchmark,
# in the same run on the same machine, with the same thread count.
#   benches/compare_onnxruntime.sh [MODEL.onnx]     (THREADS=2 by default)
# ONNX Runtime comes from PyPI into a virtual environment under target/ (made on first use).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
onnx=${1:-$root/../shared/fixtures/monai/swinunetr_fs12_96.onnx}
threads=${THREADS:-2}
venv=$root/target/ort-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import onnxruntime, numpy' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet onnxruntime numpy
fi
echo "== ONNX Runtime ($onnx, $threads intra-op threads)"
"$venv/bin/python" "$root/benches/onnxruntime_forward.py" --model "$onnx" --threads "$threads" --runs 5
echo "== prosam (criterion, RAYON_NUM_THREADS=$threads)"
cd "$root"
RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads cargo bench --bench forward
