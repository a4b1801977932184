#!/usr/bin/env bash
# One call on the GPU machine: install (no network), build the extension, run every GPU test file, the
# compute-sanitizer checks and the kernel benchmarks; logs and JSON go into RESULTS_DIR; a summary ends it.
# Usage: scripts/gpu_check.sh RESULTS_DIR [--e2e]   (carry .whl/ with the nvidia-cutlass wheel)
#   --e2e        also run the end-to-end generate benchmark (long); QOQ_E2E_ARGS passes its options
#   QOQ_SKIP=... space-separated steps to skip: build tests sanitizer bench (skip build only with a carried,
#                up-to-date qoq_torch/_C*.so)
#   QOQ_SANITIZE="gemm attention quant"   which --check-small runs compute-sanitizer checks (default: all)
#   QOQ_BENCH="gemm attention quant"      which kernel benchmarks run (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: scripts/gpu_check.sh RESULTS_DIR [--e2e]}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
skip() { [[ " ${QOQ_SKIP:-} " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qoq_site .whl/*.whl
  export PYTHONPATH=/tmp/qoq_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # the in-place build below is imported from the checkout
declare -A STATUS
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$RESULTS/build.log"
if ! skip build; then
  t0=$(date +%s)
  QOQ_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace >>"$RESULTS/build.log" 2>&1
  STATUS[build]=$?
  echo "build: rc=${STATUS[build]} in $(( $(date +%s) - t0 )) s"
  grep -E "error" "$RESULTS/build.log" | head -20
  grep -E "bytes spill stores" "$RESULTS/build.log" | grep -v " 0 bytes spill stores" | sort | uniq -c | head -10
  cp qoq_torch/_C*.so "$RESULTS/" 2>/dev/null  # lets a later call carry the build instead of rebuilding
fi
python3 -c "import qoq_torch, json; print(json.dumps(qoq_torch.extension_status()))" | tee -a "$RESULTS/build.log"

if ! skip tests; then
  for f in tests/test_*_cuda.py; do
    timeout "${QOQ_TEST_TIMEOUT:-240}" python3 -X faulthandler -m pytest -q -p no:cacheprovider -m cuda "$f" \
      >>"$RESULTS/tests.log" 2>&1
    STATUS[test:$(basename "$f" .py)]=$?
    grep -E "passed|failed|error" "$RESULTS/tests.log" | tail -1
  done
  grep -E "^(FAILED|ERROR)|Fatal Python" "$RESULTS/tests.log" | head -30
fi

if ! skip sanitizer; then
  for b in ${QOQ_SANITIZE:-gemm attention quant}; do
    for tool in memcheck racecheck; do
      timeout "${QOQ_SANITIZER_TIMEOUT:-180}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        python3 "benchmarks/$b.py" --check-small \
        >>"$RESULTS/sanitizer.log" 2>&1
      STATUS[sanitizer:$b:$tool]=$?
    done
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$RESULTS/sanitizer.log" | sort | uniq -c
fi

if ! skip bench; then
  for b in ${QOQ_BENCH:-gemm attention quant}; do
    timeout "${QOQ_BENCH_TIMEOUT:-240}" python3 "benchmarks/$b.py" --json "$RESULTS/$b.json" >>"$RESULTS/bench.log" 2>&1
    STATUS[bench:$b]=$?
  done
  grep -E "\| sum \||^\| *(1|16|64|256) *\| *(4096|32768)" "$RESULTS/bench.log" | head -40
fi

if [ "${2:-}" = "--e2e" ]; then
  # shellcheck disable=SC2086
  timeout "${QOQ_E2E_TIMEOUT:-480}" python3 benchmarks/e2e.py --json "$RESULTS/e2e.json" ${QOQ_E2E_ARGS:-} \
    >"$RESULTS/e2e.log" 2>&1
  STATUS[e2e]=$?
  grep -E "^\|" "$RESULTS/e2e.log"
fi

echo; echo "== summary: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null), torch $(python3 -c 'import torch;print(torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null)"
for key in "${!STATUS[@]}"; do printf '%-36s rc=%s\n' "$key" "${STATUS[$key]}"; done | sort
