#!/usr/bin/env bash
# The GPU checks of AnchorFormer's fused anchor-attention kernels, in under five minutes on one
# H100 (80 GB), from the repository's virtual environment:
#
#   1. the benchmarks of the `full` preset (anchorformer/configs/bench.yaml: the operator at
#      B=8, H=6, D=64, M=30 in bf16 for N = 196 ... 65536 against the eager and compiled
#      reference and flash attention; DeiT vs AnchorFormer T/S at 224/512/1024, inference and
#      training), written to benchmarks/results/<device>_<UTC date>.json with .md and figures;
#   2. the kernel tests on CUDA (tests/test_triton_kernels.py -m gpu, fixed launch
#      configurations to save compile time), JUnit report and log next to the JSON;
#   3. one short training and evaluation of each task (cls, det, seg) on CUDA with bf16 autocast
#      and the fused kernel, on the mini sets (metrics next to the JSON; TASKS_S per task).
#
# Each part runs under a timeout so that the whole stays within BUDGET_S seconds (default 290);
# an interrupted benchmark keeps what it finished (its JSON says "complete": false).
# Usage: benchmarks/gpu.sh [extra `anchorformer bench` arguments, e.g. --set repeats=20]
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-290}
BENCH_S=${BENCH_S:-165}
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
start=$SECONDS

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device visible to $PY" >&2
  exit 2
fi
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')
name="${device}_$(date -u +%Y%m%d)"
out=benchmarks/results
mkdir -p "$out"
echo "gpu.sh: device $device, results in $out/$name.*"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv > "$out/${name}_nvidia-smi.csv" 2>/dev/null || true

# 1. Benchmarks.
timeout --signal=INT --kill-after=10 "$BENCH_S" \
  "$PY" -m anchorformer.cli bench --profile full --device cuda --out-dir "$out" --name "$name" "$@" \
  2>&1 | tee "$out/${name}_bench.log"
bench_rc=${PIPESTATUS[0]}

# 2. Kernel tests on CUDA, in the time that is left.
left=$((BUDGET_S - (SECONDS - start)))
if [ "$left" -lt 30 ]; then
  echo "gpu.sh: only ${left}s left, kernel tests not run" | tee "$out/${name}_tests.log"
  tests_rc=124
else
  ANCHORFORMER_TRITON_AUTOTUNE=0 timeout --signal=INT --kill-after=10 "$left" \
    "$PY" -m pytest tests/test_triton_kernels.py -m gpu -q -p no:cacheprovider \
    --junitxml="$out/${name}_tests.xml" 2>&1 | tee "$out/${name}_tests.log" | tail -n 25
  tests_rc=${PIPESTATUS[0]}
fi

# 3. The GPU path of each task: one short training and evaluation of cls, det and seg on CUDA,
#    bf16 autocast, the fused kernel (ANCHORFORMER_ATTN_IMPL=triton), on the mini sets made here.
#    Metrics land in $out/${name}_{cls,det,seg}/metrics.json. TASKS_S bounds the whole part.
TASKS_S=${TASKS_S:-240}
tasks_rc=0
if [ "${SKIP_TASKS:-0}" != "1" ]; then
  work=$(mktemp -d)
  "$PY" -m anchorformer.cli data make-mini --out "$work/data" > "$out/${name}_tasks.log" 2>&1 || tasks_rc=1
  export ANCHORFORMER_ATTN_IMPL=triton
  run_task() {  # name, command...
    local task=$1; shift
    echo "gpu.sh: $task" | tee -a "$out/${name}_tasks.log"
    timeout --signal=INT --kill-after=10 "$TASKS_S" "$@" >> "$out/${name}_tasks.log" 2>&1 || tasks_rc=1
  }
  run_task cls "$PY" -m anchorformer.cli train cls --data "$work/data/imagenet" \
    --model anchorformer_tiny_patch16_224 --out "$out/${name}_cls" --profile mini --epochs 2 \
    --set device=cuda amp=true amp_dtype=bfloat16 threads=null num_workers=4
  run_task det "$PY" -m anchorformer.cli train det --data "$work/data/coco" \
    --backbone anchorformer_tiny_patch16_224 --out "$out/${name}_det" --profile mini --epochs 2 \
    --set device=cuda --set amp=true --set threads=null
  run_task seg "$PY" -m anchorformer.cli train seg --data "$work/data/ade20k/ADEChallengeData2016" \
    --backbone anchorformer_tiny_patch16_224 --head fpn --out "$out/${name}_seg" --profile mini --iters 100 \
    --set device=cuda amp=true threads=null
  unset ANCHORFORMER_ATTN_IMPL
  for task in cls det seg; do
    if [ -f "$out/${name}_${task}/metrics.json" ]; then
      cp "$out/${name}_${task}/metrics.json" "$out/${name}_${task}_metrics.json"
    else
      echo "gpu.sh: $task wrote no metrics.json" | tee -a "$out/${name}_tasks.log"; tasks_rc=1
    fi
  done
  rm -rf "$work"
fi

echo "gpu.sh: benchmarks exit $bench_rc, kernel tests exit $tests_rc, tasks exit $tasks_rc, $((SECONDS - start)) s in all"
[ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$tasks_rc" -eq 0 ]
