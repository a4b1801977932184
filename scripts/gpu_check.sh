#!/usr/bin/env bash
# One call on the GPU machine: install (no network), build the extension, run the GPU tests and every
# benchmark, write logs and JSON into RESULTS_DIR, end with a summary table.
# Usage: scripts/gpu_check.sh RESULTS_DIR   (carry .whl/ with the nvidia-cutlass wheel)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qoq_site .whl/*.whl
  export PYTHONPATH=/tmp/qoq_site:${PYTHONPATH:-}
fi
declare -A STATUS
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . >"$RESULTS/build.log" 2>&1
STATUS[build]=$?; echo "build: rc=${STATUS[build]} in $(( $(date +%s) - t0 )) s"; tail -5 "$RESULTS/build.log"
python3 -c "import qoq_torch, json; print(json.dumps(qoq_torch.extension_status()))" | tee "$RESULTS/extension.json"
python3 -m pytest -q -m cuda tests --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log" | tail -25
STATUS[gpu_tests]=${PIPESTATUS[0]}
# benchmarks/e2e.py takes long: it runs only when named in QOQ_BENCHMARKS.
for bench in ${QOQ_BENCHMARKS:-$(ls benchmarks/*.py | grep -v e2e.py)}; do
  name=$(basename "$bench" .py)
  timeout "${QOQ_BENCH_TIMEOUT:-300}" python3 "$bench" --json "$RESULTS/bench_$name.json" >"$RESULTS/bench_$name.log" 2>&1
  STATUS[bench_$name]=$?
  tail -30 "$RESULTS/bench_$name.log"
done
echo; echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null), torch $(python3 -c 'import torch;print(torch.__version__)'))"
printf '%-24s %s\n' step rc
for key in "${!STATUS[@]}"; do printf '%-24s %s\n' "$key" "${STATUS[$key]}"; done | sort
