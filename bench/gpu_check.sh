#!/usr/bin/env bash
# Everything a GPU session should run, in under 10 minutes on one H100/H200:
#   1. the gpu-marked tests (bf16, real shapes),  2. every kernel suite vs its peers,
#   3. the d20 training step eager vs fused (+ one profiled step).
# Results go to $OUT when set (the device tool), else bench/results/. Commit the JSON with the numbers in the note.
#   bash bench/gpu_check.sh            # or: OUT=/tmp/res bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool returns at most 8 files from $OUT: there, collect everything in one folder and tar it at the end.
FINAL="${OUT:-}"
if [ -n "$FINAL" ]; then OUT="$FINAL/r"; else OUT=bench/results; fi
export OUT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
step() {  # step <name> <seconds> <command...>: run with a time limit, keep going on failure, log to $OUT
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step gpu_tests 200 "$PY" -m pytest tests -m gpu -q -x --no-header -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step kernels 270 "$PY" -m bench.kernels --suite attention,relu2_mlp,newton_schulz,paged_decode --quick --out "$OUT"
step train 110 "$PY" -m bench.train --depth 20 --kernels eager,fused --steps 5 --warmup 2 --out "$OUT"
ls -la "$OUT"
if [ -n "$FINAL" ]; then tar czf "$FINAL/gpu_check.tgz" -C "$OUT" . && rm -rf "$OUT"; fi
exit $status
