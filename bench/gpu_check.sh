#!/usr/bin/env bash
# The GPU check, in about 12 minutes on one H100/H200 (estimated):
#   1. the gpu-marked tests (bf16, real shapes),  2. every kernel suite vs its peers, the Engine's decode on a random
#   d12 (eager, fused, fused + CUDA graphs; batch 1 and 64),  3. the d20 training step: eager vs fused, each with and
#   without torch.compile; the fused preset's batch 32.
# Results go to $OUT when set, else bench/results/ (JSON + PNG per suite, with device, versions and commit).
#   bash bench/gpu_check.sh            # or: OUT=/tmp/res bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# With $OUT set, everything lands in one folder, tarred at the end: one file to copy back from a remote machine.
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
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# Only the files that hold gpu tests: collecting all of tests/ imports modules this machine may lack (fastapi for
# test_server.py), and one collection error stops pytest before any test runs. No -x: one failure must not hide the
# others. pytest-xdist (when installed) runs the files on 4 workers: the time goes into single-threaded Triton
# compiles, and the GPU has room for all four (results are checks, not timings).
GPU_TESTS=$(grep -l "@pytest.mark.gpu" tests/test_*.py)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")
# shellcheck disable=SC2086
step gpu_tests 170 "$PY" -m pytest $GPU_TESTS -m gpu -v $XDIST --durations=15 --no-header -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml"
step kernels 260 "$PY" -m bench.kernels --suite attention,relu2_mlp,newton_schulz,paged_decode,linear_cross_entropy --quick --out "$OUT"
step engine 120 "$PY" -m bench.engine --quick --depth 12 --head-dim 128 --samples 1,64 --out "$OUT"  # d12, batch 1 and 64
# The four-way table at d20 (eager, eager+compile, fused, fused+compile, each vs eager+compile) at batch 16, which
# all four fit: eager keeps ~21 (B*T, C) bf16 tensors per layer plus ~4 fp32 (B*T, vocab) logit tensors at the
# loss, an estimated ~140 GB at batch 32 (bench/train.py's docstring has the arithmetic). The first warm-up step of
# a compiled configuration runs inductor (estimated ~1 min each). peak_mem_gib scales with the batch.
step train 200 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" -m bench.train --depth 20 \
  --kernels eager,fused --compile off,on --steps 3 --warmup 2 --device-batch-size 16 --out "$OUT"
# The fused d20 preset's shape: 32 x 2048 tokens per GPU, no accumulation, compiled (estimated ~52 GB). Its own
# output folder: both runs write train-<device>-<date>.json.
step train_b32 80 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" -m bench.train --depth 20 \
  --kernels fused --compile on --steps 2 --warmup 1 --device-batch-size 32 --out "$OUT/b32"
ls -la "$OUT"
if [ -n "$FINAL" ]; then tar czf "$FINAL/gpu_check.tgz" -C "$OUT" . && rm -rf "$OUT"; fi
exit $status
