#!/usr/bin/env bash
# One GPU call for the activation-quantization and KV4 attention kernels: build csrc/quant + csrc/attention
# only, CUDA tests, benchmarks (attention, quant), compute-sanitizer memcheck + racecheck on small cases.
# Logs and JSON go to $OUT. Usage on the device machine (repo root, carry .whl):
#   bash scripts/gpu_kernels.sh [--quick]     (--quick: short attention benchmark)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qoq_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
# At most 8 files come back from $OUT: build.txt, tests.txt, bench.txt, attention.json/.png, quant.json (+ the caller's log).
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv

# Build qoq_torch._C from csrc/module.cpp + csrc/quant + csrc/attention only (other families cannot break it).
t0=$(date +%s)
QOQ_PTXAS_VERBOSE=1 QOQ_CSRC_ONLY=quant,attention MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace >"$OUT/build.txt" 2>&1
BUILD_RC=$?
echo "build rc=$BUILD_RC in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
grep -E "error|spill stores" "$OUT/build.txt" | grep -v " 0 bytes spill stores" | head -n 20
python3 -c "import qoq_torch.ops as o; s=o.extension_status(); print(s); assert 'kv4_decode_attention' in s['cuda_ops']" \
  2>&1 || { echo "extension did not load"; tail -n 40 "$OUT/build.txt"; exit 1; }

# One pytest process per file: a crash in one cannot hide the other's results.
TEST_RC=0
for f in tests/test_attention_cuda.py tests/test_quant_cuda.py; do
  timeout 150 python3 -m pytest -q -p no:cacheprovider --durations=5 "$f" 2>&1 | tee -a "$OUT/tests.txt" | tail -n 25
  rc=${PIPESTATUS[0]}; echo "$f rc=$rc" | tee -a "$OUT/tests.txt"; [ "$rc" != 0 ] && TEST_RC=$rc
done
if grep -q "Segmentation fault" "$OUT/tests.txt"; then  # where a crash happens, with cuda-gdb (no gdb there)
  timeout 90 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider -x \
    tests/test_quant_cuda.py::test_bad_input_rejected tests/test_attention_cuda.py::test_bad_input_rejected 2>&1 \
    | grep -v "^\[" | tail -n 40 | tee -a "$OUT/tests.txt"
fi

ATT_ARGS=()
[ "${1:-}" = "--quick" ] && ATT_ARGS+=(--quick)
timeout 150 python3 benchmarks/attention.py --json "$OUT/attention.json" --png "$OUT/attention.png" "${ATT_ARGS[@]}" \
  2>&1 | tee "$OUT/bench.txt" | grep -v '^{' | tail -n 30
timeout 60 python3 benchmarks/quant.py --json "$OUT/quant.json" 2>&1 | tee -a "$OUT/bench.txt" | tail -n 16

SAN=compute-sanitizer
command -v $SAN >/dev/null || SAN=/usr/local/cuda/bin/compute-sanitizer
SMALL="import sys; sys.path.insert(0, 'benchmarks'); import attention, quant; attention.check_small(); quant.check_small()"
{ timeout 120 $SAN --tool memcheck --print-limit 4 --error-exitcode 9 python3 -c "$SMALL" 2>&1 | grep -v "^check" | tail -n 40; echo "memcheck rc=${PIPESTATUS[0]}"
  timeout 120 $SAN --tool racecheck --error-exitcode 9 python3 -c "$SMALL" 2>&1 | tail -n 6; echo "racecheck rc=${PIPESTATUS[0]}"
} | tee -a "$OUT/bench.txt"

echo "=== summary ==="
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -n 3
grep "rc=" "$OUT/bench.txt"
echo "tests rc=$TEST_RC build rc=$BUILD_RC"
