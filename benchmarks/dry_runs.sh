#!/usr/bin/env bash
# 1. The cost of the standard models (benchmarks/step_costs.py): AnchorFormer and DeiT T/S at
#    224² and 128 images per device, the Mask R-CNN detectors at 1333x800 and 2 per device, the
#    FPN/UperNet segmenters at 512² and 2 per device, DeiT's teacher forward; STEPS timed optimizer
#    steps each (default 20 after 5 warm-up) -> results/step_costs_<device>_<date>.json (step
#    times, images/s, peak memory). On `cpu` the tiny form (shrunk models and inputs, 2 steps):
#    the code path, not a cost. The README's GPU-hours table comes from the newest
#    step_costs_cuda_*.json: `python benchmarks/cost_table.py --write` after a cuda run.
# 2. One dry run of each full recipe (`--set dry_run=true`: a few optimizer steps and a tiny evaluation
#    through every code path of the recipe; README, "Running the full profile") on DEVICE, on the mini
#    sets, each within a time cap; the step times land in results/dry_runs_<device>_<date>.json.
#
#   benchmarks/dry_runs.sh [cuda|cpu] [seconds per run, default 300]
#   ONLY=costs benchmarks/dry_runs.sh cpu     # part 1 alone; RESULTS=DIR writes there instead
#
# Classification distils from a stand-in teacher written here (a randomly initialised
# regnety_160, DeiT's teacher architecture, at the mini set's 10 classes): the same code path as
# DeiT's regnety_160.deit_in1k read from teacher_checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda}
CAP=${2:-300}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
WORK=$(mktemp -d -t dry_runs_XXXX)
trap 'rm -rf "$WORK"' EXIT
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
OUT="$RESULTS/dry_runs_${DEVICE}_$(date +%Y%m%d).json"

COSTS="$RESULTS/step_costs_${DEVICE}_$(date +%Y%m%d).json"
if [ "$DEVICE" = cuda ]; then
  $PY benchmarks/step_costs.py --device cuda --steps "${STEPS:-20}" --warmup 5 --out "$COSTS"
else
  $PY benchmarks/step_costs.py --device "$DEVICE" --tiny --steps 2 --warmup 1 --out "$COSTS"
fi
echo "wrote $COSTS"
[ "${ONLY:-}" = costs ] && exit 0

$PY -m anchorformer.cli data make-mini --out "$WORK/mini" >/dev/null
$PY - "$WORK/teacher.safetensors" <<'PY'
import sys, timm, safetensors.torch as st
st.save_file(timm.create_model("regnety_160", num_classes=10).state_dict(), sys.argv[1])
PY

run() {  # name, then the train command's arguments
  local name=$1; shift
  local t0=$SECONDS rc=0
  timeout "$CAP" $PY -m anchorformer.cli train "$@" --profile full --resume never \
    --set dry_run=true --set device="$DEVICE" >"$WORK/$name.log" 2>&1 || rc=$?
  echo "$name: rc $rc, $((SECONDS - t0)) s (log: tail below)"; tail -n 3 "$WORK/$name.log"
  cp "$WORK/$name/metrics.json" "$WORK/$name.metrics.json" 2>/dev/null || true
}
run cls cls --data "$WORK/mini/imagenet" --out "$WORK/cls" --model anchorformer_tiny_distilled_patch16_224 \
  --set teacher_checkpoint="$WORK/teacher.safetensors"
run det det --data "$WORK/mini/coco" --out "$WORK/det" --model anchorformer_tiny_patch16_224
run seg_fpn seg --data "$WORK/mini/ade20k/ADEChallengeData2016" --out "$WORK/seg_fpn" \
  --model anchorformer_tiny_patch16_224 --head fpn
run seg_upernet seg --data "$WORK/mini/ade20k/ADEChallengeData2016" --out "$WORK/seg_upernet" \
  --model anchorformer_small_patch16_224 --head upernet

$PY - "$WORK" "$OUT" "$DEVICE" <<'PY'
import json, sys
from pathlib import Path
work, out, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
keys = ("global_batch", "world_size", "accum_steps", "train_time_s", "train_seconds", "iterations", "iters",
        "epochs", "top1", "teacher_top1", "bbox_AP", "segm_AP", "mIoU")
rows = {}
for name in ("cls", "det", "seg_fpn", "seg_upernet"):
    f = work / f"{name}.metrics.json"
    rows[name] = {k: v for k, v in json.loads(f.read_text()).items() if k in keys} if f.is_file() else {"failed": True}
Path(out).write_text(json.dumps({"device": device, "runs": rows}, indent=2) + "\n")
print(json.dumps(rows, indent=2))
sys.exit(1 if any("failed" in r for r in rows.values()) else 0)
PY
echo "wrote $OUT"
