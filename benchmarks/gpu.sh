#!/usr/bin/env bash
# The GPU checks of AnchorFormer's fused anchor-attention kernels on one H100/H200, from the
# repository's prebuilt virtual environment, within BUDGET_S seconds (default 480: 8 minutes) as a
# whole: every part, CUDA start, Triton compilation and autotuning and inductor compilation
# included, runs under a timeout cut to the time left before one deadline, and a part that would
# get under 10 s is skipped (said in the log). Parts, in order:
#
#   1. the operator table and the fair whole-model benchmark of the `full` preset, eager
#      (anchorformer/configs/bench.yaml: the operator at B=8, H=6, D=64, M=30 in bf16 for
#      N = 196 ... 65536 against the eager and compiled reference and flash attention; DeiT vs
#      AnchorFormer and its fused inference form at T (MODEL_SIZES) on 224² batch 256 and 1024²
#      batch 32 / 16, bf16 autocast, >= 20 steps by do_bench, the GPU-busy fraction beside each),
#      written to benchmarks/results/<device>_<UTC date>.json with .md and figures; at most
#      BENCH_S (default 200) s; an interrupted run keeps what it finished ("complete": false);
#   2. the kernel tests on CUDA, at most TESTS_S (default 120) s: `-m "gpu and not slow"`, fixed
#      launch configurations; the fp32 and D = 128 variants (the long compilations) are `slow`
#      and left out; JUnit report and log next to the JSON;
#   3. the same models compiled (torch.compile) and compiled + CUDA graphs (do_bench_cudagraph),
#      only in the time that is left (at most COMPILE_S, default 150, s): <device>_<date>_compiled.*;
#   4. one short training and evaluation of each task (cls, det, seg) on CUDA with bf16 autocast
#      and the fused kernel, on mini sets made here (at most TASK_S, default 90, s each), in
#      the time that is left (SKIP_TASKS=1 leaves them out);
#   5. one dry run of each full recipe on CUDA (benchmarks/dry_runs.sh; at most DRY_S, default
#      240, s; SKIP_DRY_RUNS=1 leaves them out).
# With the default budget parts 4 and 5 get no time: BUDGET_S=900 runs them too.
#
# Triton's and inductor's caches persist across runs (CACHE_DIR, default ~/.cache/anchorformer),
# so a second run compiles nothing. DRY_RUN=1 prints each part and its time cap instead of
# running it (logs in a temporary folder). OUT_DIR overrides benchmarks/results.
# Usage: benchmarks/gpu.sh [extra `anchorformer bench` arguments, e.g. --set repeats=20]
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-480}
BENCH_S=${BENCH_S:-200}
TESTS_S=${TESTS_S:-120}
COMPILE_S=${COMPILE_S:-150}
MODEL_SIZES=${MODEL_SIZES:-[tiny]}
TASK_S=${TASK_S:-90}
KILL_S=10       # after a part's timeout (SIGINT), SIGKILL this much later: counted inside its cap
RESERVE_S=5     # kept for the summary
DRY_RUN=${DRY_RUN:-0}
start=$SECONDS
exec 3>&1       # the console, whatever a part's output is redirected to
deadline=$((start + BUDGET_S - RESERVE_S))

# bounded CAP CMD...: run CMD under a timeout of min(CAP, time left) seconds, SIGKILL included.
bounded() {
  local cap=$1; shift
  local t=$((deadline - SECONDS))
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt $((KILL_S + 10)) ]; then
    echo "gpu.sh: $((deadline - SECONDS)) s left, skipped: $*" | tee /dev/fd/3 >&2
    return 124
  fi
  if [ "$DRY_RUN" = "1" ]; then
    echo "gpu.sh: would run (at most $t s): $*" >&3
    return 0
  fi
  timeout --signal=INT --kill-after=$KILL_S $((t - KILL_S)) "$@"
}

if [ ! -x "$PY" ]; then
  echo "gpu.sh: no Python at $PY: build the project's virtual environment first ('make env', which" \
    "creates .venv), or set PYTHON to a Python with CUDA PyTorch, Triton and the project installed" >&2
  exit 2
fi
if ! bounded 120 "$PY" -c "import torch, triton, timm, anchorformer"; then
  echo "gpu.sh: $PY cannot import torch, triton, timm and anchorformer: rebuild the virtual" \
    "environment ('make env') or set PYTHON" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anchorformer}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE_DIR/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE_DIR/inductor}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

if [ "$DRY_RUN" = "1" ]; then
  device=dry_run
elif ! bounded 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device visible to $PY" >&2
  exit 2
else
  device=$(bounded 60 "$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')
fi
name="${device}_$(date -u +%Y%m%d)"
out=${OUT_DIR:-benchmarks/results}
[ "$DRY_RUN" = "1" ] && out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
echo "gpu.sh: device $device, results in $out/$name.*, budget ${BUDGET_S} s, caches in $CACHE_DIR"
[ "$DRY_RUN" = "1" ] || timeout 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version \
  --format=csv > "$out/${name}_nvidia-smi.csv" 2>/dev/null || true

# 1. Benchmarks, eager. The models in one process: on the GPU their memory comes from PyTorch's
#    caching allocator (the history effect of the CPU bench is glibc's), and one process saves
#    CUDA starts and autotunings.
bounded "$BENCH_S" "$PY" -m anchorformer.cli bench --profile full --device cuda --out-dir "$out" --name "$name" \
  --set "model_processes=[shared]" --set "model_sizes=$MODEL_SIZES" --set "model_exec=[eager]" "$@" 2>&1 \
  | tee "$out/${name}_bench.log"
bench_rc=${PIPESTATUS[0]}

# 2. Kernel tests on CUDA.
ANCHORFORMER_TRITON_AUTOTUNE=0 bounded "$TESTS_S" "$PY" -m pytest tests/test_triton_kernels.py \
  -m "gpu and not slow" -q -p no:cacheprovider --junitxml="$out/${name}_tests.xml" 2>&1 \
  | tee "$out/${name}_tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

# 3. The models compiled, and compiled + CUDA graphs, in the time that is left (compiling each
#    model, mode and side takes tens of seconds; an interrupted run keeps what it finished).
compile_rc=0
if [ "${SKIP_COMPILE:-0}" != "1" ]; then
  bounded "$COMPILE_S" "$PY" -m anchorformer.cli bench --profile full --device cuda --out-dir "$out" \
    --name "${name}_compiled" --only models --set "model_processes=[shared]" --set "model_sizes=$MODEL_SIZES" \
    --set "model_exec=[compiled,cudagraphs]" "$@" > "$out/${name}_compiled.log" 2>&1
  compile_rc=$?
  [ "$compile_rc" -eq 124 ] && echo "gpu.sh: compiled models: out of time (kept what finished)" && compile_rc=0
fi

# 4. The GPU path of each task: one short training and evaluation of cls, det and seg on CUDA,
#    bf16 autocast, the fused kernel (ANCHORFORMER_ATTN_IMPL=triton), on the mini sets made here.
#    Metrics land in $out/${name}_{cls,det,seg}/metrics.json.
tasks_rc=0
if [ -z "${SKIP_TASKS:-}" ] && [ $((deadline - SECONDS)) -lt $((3 * TASK_S + 60)) ]; then
  echo "gpu.sh: $((deadline - SECONDS)) s left: the tasks are left out (a larger BUDGET_S runs them)"
  SKIP_TASKS=1
fi
if [ "${SKIP_TASKS:-0}" != "1" ]; then
  work=$(mktemp -d)
  bounded 60 "$PY" -m anchorformer.cli data make-mini --out "$work/data" > "$out/${name}_tasks.log" 2>&1 || tasks_rc=1
  run_task() {  # name, command...
    local task=$1; shift
    echo "gpu.sh: $task" | tee -a "$out/${name}_tasks.log"
    ANCHORFORMER_ATTN_IMPL=triton bounded "$TASK_S" "$@" >> "$out/${name}_tasks.log" 2>&1 || tasks_rc=1
  }
  run_task cls "$PY" -m anchorformer.cli train cls --data "$work/data/imagenet" \
    --model anchorformer_tiny_patch16_224 --out "$out/${name}_cls" --profile mini --epochs 2 \
    --set device=cuda --set amp=true --set amp_dtype=bfloat16 --set threads=null --set num_workers=4
  run_task det "$PY" -m anchorformer.cli train det --data "$work/data/coco" \
    --model anchorformer_tiny_patch16_224 --out "$out/${name}_det" --profile mini --epochs 2 \
    --set device=cuda --set amp=true --set threads=null
  run_task seg "$PY" -m anchorformer.cli train seg --data "$work/data/ade20k/ADEChallengeData2016" \
    --model anchorformer_tiny_patch16_224 --head fpn --out "$out/${name}_seg" --profile mini --iters 100 \
    --set device=cuda --set amp=true --set threads=null
  if [ "$DRY_RUN" != "1" ]; then
    for task in cls det seg; do
      if [ -f "$out/${name}_${task}/metrics.json" ]; then
        cp "$out/${name}_${task}/metrics.json" "$out/${name}_${task}_metrics.json"
      else
        echo "gpu.sh: $task wrote no metrics.json" | tee -a "$out/${name}_tasks.log"; tasks_rc=1
      fi
    done
  fi
  rm -rf "$work"
fi

# 5. One dry run of each full recipe on CUDA (`--set dry_run=true`: every code path of the full
#    recipes, a few steps each), in the time that is left: step times in results/dry_runs_cuda_<date>.json.
dry_rc=0
if [ -z "${SKIP_DRY_RUNS:-}" ] && [ $((deadline - SECONDS)) -lt 60 ]; then
  echo "gpu.sh: $((deadline - SECONDS)) s left: the dry runs are left out (a larger BUDGET_S runs them)"
  SKIP_DRY_RUNS=1
fi
if [ "${SKIP_DRY_RUNS:-0}" != "1" ]; then
  bounded "${DRY_S:-240}" env PYTHON="$PY" bash benchmarks/dry_runs.sh cuda 90 > "$out/${name}_dry_runs.log" 2>&1 || dry_rc=$?
fi

echo "gpu.sh: benchmarks exit $bench_rc, kernel tests exit $tests_rc, compiled models exit $compile_rc," \
  "tasks exit $tasks_rc, dry runs exit $dry_rc, $((SECONDS - start)) s of ${BUDGET_S} s"
[ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$compile_rc" -eq 0 ] && [ "$tasks_rc" -eq 0 ] && [ "$dry_rc" -eq 0 ]
