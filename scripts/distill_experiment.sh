#!/usr/bin/env bash
# The distillation experiment: on one phantom training set, a tiny AutoProSAM teacher, then tiny
# SwinUNETR students with lambda 0.5 (distilled) and lambda 0 (labels only), two seeds each; all
# of them scored on held-out phantoms (Dice and NSD at 2 mm, MONAI's conventions) by `prosam
# segment` + `prosam eval`. Prints a table and writes OUT/results.json.
#
#   scripts/distill_experiment.sh [OUT]          (default OUT: target/distill-experiment)
#
# Sized for about an hour on 2 cores; every knob is an environment variable:
#   TRAIN_CASES (12, of which 2 validate)  TEST_CASES (3)  SPACING (4,4,4 mm)  CROP (64)
#   TEACHER_MINUTES (16)  STUDENT_MINUTES (9)  SEEDS ("1 2")  LAMBDAS ("0.5 0")  THREADS (2)
#   CROP_SAMPLING (classes: crops centred on each present class in turn, for teacher and students;
#   pos_neg is MONAI's reference RandCropByPosNegLabeld, 2:1)  CE_WEIGHT (inverse_sqrt, the students' class-weighted
#   cross-entropy; none for the reference). Both arms of the comparison get the same recipe.
#   KD (mse: MSE on logits, the default; mse_prob, kl or kl:T as `distill --kd`; students with
#   another KD than mse are named ..._kd-<KD>_seed..., so one OUT can hold several: e.g.
#   KD=kl:2 LAMBDAS=0.5 after a default run adds two students and scores everything again)
# Each run stops after its minutes (--max-minutes) with the learning rate already decayed over
# the epochs it was given, so the figures are of short trainings: compare them with each other.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/distill-experiment}
train_cases=${TRAIN_CASES:-12}
test_cases=${TEST_CASES:-3}
spacing=${SPACING:-4,4,4}
crop=${CROP:-64}
teacher_minutes=${TEACHER_MINUTES:-16}
student_minutes=${STUDENT_MINUTES:-9}
seeds=${SEEDS:-1 2}
lambdas=${LAMBDAS:-0.5 0}
threads=${THREADS:-2}
crop_sampling=${CROP_SAMPLING:-classes}
ce_weight=${CE_WEIGHT:-inverse_sqrt}
kd=${KD:-mse}
kd_suffix=""
[ "$kd" = mse ] || kd_suffix="_kd-${kd//:/}"
# Both binaries keep freed tensors in the heap (`resources::retain_freed_memory`); no allocator
# variables are needed.

cd "$root"
cargo build --release -p prosam-runtime -p prosam-distill
prosam="$root/target/release/prosam --threads $threads"
distill="$root/target/release/prosam-distill --threads $threads --quiet"
mkdir -p "$out"
log() { echo "[$(date +%H:%M:%S)] $*"; }

log "phantoms: $train_cases for training (seeds 2000..), $test_cases held out (seeds 3000..)"
[ -f "$out/train/dataset.json" ] || $prosam --quiet phantom --out "$out/train" --cases "$train_cases" --seed 2000 --validation 2
[ -f "$out/test/dataset.json" ] || $prosam --quiet phantom --out "$out/test" --cases "$test_cases" --seed 3000

# Epoch counts sized so that the schedule's decay ends near the time limit (one step at 64^3
# takes about 2.4 s here for the tiny teacher and 4.9 s for a student, with or without the
# teacher's forward pass; 10 crops an epoch).
steps_teacher=$((teacher_minutes * 60 * 10 / 24)); steps_student=$((student_minutes * 60 * 10 / 49))
cases=$((train_cases - 2))
epochs_teacher=$(( (steps_teacher + cases - 1) / cases )); epochs_student=$(( (steps_student + cases - 1) / cases ))

models=()
if [ ! -f "$out/teacher/teacher.safetensors" ]; then
  log "teacher: tiny, crop $crop, $epochs_teacher epochs, at most $teacher_minutes min"
  $distill train-teacher --data "$out/train/dataset.json" --preset tiny --crop "$crop" --spacing "$spacing" \
    --out "$out/teacher" --epochs "$epochs_teacher" --warmup-epochs 0 --lr 1e-3 --val-every "$epochs_teacher" \
    --max-minutes "$teacher_minutes" --crop-sampling "$crop_sampling"
fi
models+=("teacher=$out/teacher/teacher.safetensors")
for seed in $seeds; do
  for lambda in $lambdas; do
    name="student_lambda${lambda}${kd_suffix}_seed${seed}"
    if [ ! -f "$out/$name/student.safetensors" ]; then
      log "$name: $epochs_student epochs, at most $student_minutes min"
      $distill distill --teacher "$out/teacher/teacher.safetensors" --student tiny --data "$out/train/dataset.json" \
        --lambda "$lambda" --kd "$kd" --crop "$crop" --out "$out/$name" --epochs "$epochs_student" --warmup-epochs 0 \
        --lr 1e-3 --val-every "$epochs_student" --seed "$seed" --name "$name" --max-minutes "$student_minutes" \
        --crop-sampling "$crop_sampling" --ce-weight "$ce_weight"
    fi
    models+=("$name=$out/$name/student.safetensors")
  done
done

log "scoring ${#models[@]} models on $test_cases held-out phantoms"
mkdir -p "$out/eval"
for entry in "${models[@]}"; do
  name=${entry%%=*}; model=${entry#*=}
  for image in "$out"/test/imagesTr/*.nii.gz; do
    case_name=$(basename "$image" .nii.gz)
    seg="$out/eval/${name}_${case_name}.nii.gz"
    $prosam --quiet segment -m "$model" -i "$image" -o "$seg"
    $prosam eval --json --pred "$seg" --truth "$out/test/labelsTr/$case_name.nii.gz" > "$out/eval/${name}_${case_name}.json"
  done
done

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "eval", "*.json"))):
    name = os.path.basename(f).rsplit("_phantom_", 1)[0]
    r = json.load(open(f))
    rows.setdefault(name, []).append(r)
def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")
results = {}
organs = sorted({o for rs in rows.values() for r in rs for o in r["dice"]})
for name, rs in rows.items():
    results[name] = {
        "mean_dice": mean([r["mean_dice"] for r in rs]),
        "mean_nsd": mean([r["mean_nsd"] for r in rs]),
        "dice": {o: mean([r["dice"].get(o) for r in rs]) for o in organs},
        "cases": len(rs),
    }
groups = {}
for name, r in results.items():
    key = name.split("_seed")[0]
    groups.setdefault(key, []).append(r)
width = max(len(k) for k in groups) + len(" (mean of seeds)")
print(f"{'model':<{width}} {'mean Dice':>9} {'mean NSD':>9}")
for name in sorted(results):
    print(f"{name:<{width}} {results[name]['mean_dice']:>9.4f} {results[name]['mean_nsd']:>9.4f}")
for key, rs in sorted(groups.items()):
    if len(rs) > 1:
        print(f"{key + ' (mean of seeds)':<{width}} {mean([r['mean_dice'] for r in rs]):>9.4f} {mean([r['mean_nsd'] for r in rs]):>9.4f}")
print()
def short(name):
    return name.replace("student_lambda", "L").replace("_seed", "/s")[:14]
print(f"{'organ Dice':<26}" + "".join(f"{short(n):>15}" for n in sorted(results)))
for o in organs:
    print(f"{o:<26}" + "".join(f"{results[n]['dice'][o]:>15.3f}" for n in sorted(results)))
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
log "done: $out/results.json"
