#!/usr/bin/env bash
# One GPU call for the W4A8 GEMM: build the gemm kernels only, CUDA tests, compute-sanitizer (memcheck +
# racecheck) on small cases, tile/split sweep, full benchmark. Logs and JSON go to $OUT.
# Usage on the device machine (repo root, carry .whl):  bash scripts/gpu_gemm.sh [--no-sweep | --decode]
# --decode: the decode-kernel sweep (benchmarks/gemm.py --sweep-decode) and the benchmark at M <= 16 only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qoq_gemm_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

# Build qoq_torch._C from csrc/module.cpp + csrc/gemm only, so half-written kernels elsewhere cannot break it.
t0=$(date +%s)
QOQ_PTXAS_VERBOSE=1 QOQ_CSRC_ONLY=gemm MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace 2>&1 | tail -n 30 | tee "$OUT/build.txt"
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"
python3 -c "import qoq_torch.ops as o; s=o.extension_status(); print(s); assert 'w4a8_gemm_per_group' in s['cuda_ops']" \
  2>&1 | tee "$OUT/ext.txt" || { echo "extension did not load"; exit 1; }

python3 -X faulthandler -m pytest -v -p no:cacheprovider tests/test_gemm_cuda.py >"$OUT/tests.txt" 2>&1
TEST_RC=$?
grep -E "FAILED|ERROR|Fatal|Segmentation|passed|failed" "$OUT/tests.txt" | tail -n 12
[ $TEST_RC -eq 139 ] && grep -B2 -A12 "Fatal Python" "$OUT/tests.txt" | head -40

SAN=compute-sanitizer
command -v $SAN >/dev/null || SAN=/usr/local/cuda/bin/compute-sanitizer
{ $SAN --tool memcheck --error-exitcode 9 python3 benchmarks/gemm.py --check-small 2>&1 | tail -n 8; echo "memcheck rc=${PIPESTATUS[0]}"
  $SAN --tool racecheck --error-exitcode 9 python3 benchmarks/gemm.py --check-small 2>&1 | tail -n 8; echo "racecheck rc=${PIPESTATUS[0]}"
} | tee "$OUT/sanitizer.txt"

MS_ARG=()
if [ "${1:-}" = "--decode" ]; then
  python3 benchmarks/gemm.py --sweep-decode --json "$OUT/sweep_decode.json" 2>&1 | tee "$OUT/sweep_decode.txt"
  MS_ARG=(--ms 1,2,4,8,16)
elif [ "${1:-}" != "--no-sweep" ]; then
  python3 benchmarks/gemm.py --sweep --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | tail -n 60
fi
python3 benchmarks/gemm.py "${MS_ARG[@]}" --json "$OUT/gemm.json" --png "$OUT/gemm.png" 2>&1 | tee "$OUT/bench.txt"

echo "=== summary ==="
grep -E "passed|failed" "$OUT/tests.txt" | tail -n 2
grep "rc=" "$OUT/sanitizer.txt"
grep "| sum |" "$OUT/bench.txt"
grep "decode vs mma" "$OUT/bench.txt"
echo "tests rc=$TEST_RC"
