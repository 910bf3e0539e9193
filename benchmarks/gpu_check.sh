#!/usr/bin/env bash
# The prepared check for a GPU machine (one H100 / H200, about 8 minutes in all):
#   1. the environment (nvidia-smi, versions);
#   2. the native build with its CUDA kernels;
#   3. every `-m gpu` test (Triton and CUDA kernels against their references, on the GPU);
#   4. benchmarks/gpu_report.py for every registered case.
# Everything lands in OUT (default gpu-check-out/): env.txt, build.log, gpu-tests.log, gpu-tests.xml and
# the report files (report.json, report.md, report.png); summary.txt says which step passed.
#
#   bash benchmarks/gpu_check.sh [--out DIR]
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]   # no GPU: the same steps, on CPU, in seconds
#
# --dry-run (CI runs it: tests/test_gpu_check.py) skips the CUDA build, collects the `-m gpu` tests
# without running them and runs gpu_report.py --cpu-smoke on one case, so that the script cannot rot.
# Each step has its own time limit; a step that fails or times out is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu-check-out
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
status=0

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log, record the result
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] && verdict="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="failed (exit $rc)"
  [ $rc -ne 0 ] && status=1
  echo "$name: $verdict in $((SECONDS - start))s (log: $log)" | tee -a "$summary"
}

{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$py" -m duo_kernels.info 2>&1
} > "$out/env.txt"

if [ $dry -eq 1 ]; then
  step "native build (CPU only)" 600 "$out/build.log" env DUO_KERNELS_NO_CUDA_BUILD=1 "$py" -c \
    "from duo_kernels import _native; _native.load(cuda=False); print('built')"
  step "gpu tests (collected only)" 120 "$out/gpu-tests.log" "$py" -m pytest -m gpu --collect-only -q \
    --benchmark-disable tests
  step "gpu report (CPU smoke, one case)" 300 "$out/report.log" "$py" benchmarks/gpu_report.py --cpu-smoke \
    --out "$out" --cases greedy_tail
else
  step "native build (with CUDA)" 180 "$out/build.log" "$py" -c \
    "from duo_kernels import _native; m = _native.load(cuda=True); print('built', m)"
  step "gpu tests" 150 "$out/gpu-tests.log" "$py" -m pytest -m gpu -q -rs --benchmark-disable \
    --junitxml="$out/gpu-tests.xml" tests
  step "gpu report" 150 "$out/report.log" "$py" benchmarks/gpu_report.py --out "$out"
fi
cat "$summary"
exit $status
