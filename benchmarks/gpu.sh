#!/usr/bin/env bash
# The GPU checks of AnchorFormer's fused anchor-attention kernels, in under five minutes on one
# H100 (80 GB), from the repository's virtual environment:
#
#   1. the benchmarks of the `full` preset (anchorformer/configs/bench.yaml: the operator at
#      B=8, H=6, D=64, M=30 in bf16 for N = 196 ... 65536 against the eager and compiled
#      reference and flash attention; DeiT vs AnchorFormer T/S at 224/512/1024, inference and
#      training), written to benchmarks/results/<device>_<UTC date>.json with .md and figures;
#   2. the kernel tests on CUDA (tests/test_triton_kernels.py -m gpu, fixed launch
#      configurations to save compile time), JUnit report and log next to the JSON.
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

echo "gpu.sh: benchmarks exit $bench_rc, kernel tests exit $tests_rc, $((SECONDS - start)) s in all"
[ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
