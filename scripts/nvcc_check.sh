#!/usr/bin/env bash
# Compile-only check of every CUDA file against torch's headers (no GPU needed).
# Usage: scripts/nvcc_check.sh [file.cu ...]   (default: every csrc/**/*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found; skipping the CUDA compile check" >&2
  exit 0
fi
read -r TORCH_INC PY_INC CUTLASS_INC < <(python3 - <<'PY'
import os, sysconfig, torch
from torch.utils.cpp_extension import include_paths
try:
    import cutlass_library
    cut = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
except ImportError:
    cut = ""
print(":".join(include_paths()), sysconfig.get_paths()["include"], cut or "-")
PY
)
INCS=(-Icsrc -I"$PY_INC")
IFS=: read -ra TI <<<"$TORCH_INC"; for d in "${TI[@]}"; do INCS+=(-I"$d"); done
[ "$CUTLASS_INC" != "-" ] && INCS+=(-I"$CUTLASS_INC")
ARCHS=${QOQ_CHECK_ARCHS:-"-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80"}
FILES=("$@")
[ ${#FILES[@]} -eq 0 ] && mapfile -t FILES < <(find csrc -name '*.cu' | sort)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# A CPU-only torch wheel lacks the CMake-generated c10/cuda macro header; an empty one suffices to compile.
if ! ls "${TI[0]}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  mkdir -p "$tmp/stub/c10/cuda/impl"
  echo '#pragma once' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  INCS+=(-I"$tmp/stub")
fi
status=0
for f in "${FILES[@]}"; do
  # shellcheck disable=SC2086
  if nvcc -c -std=c++17 -O1 --expt-relaxed-constexpr $ARCHS "${INCS[@]}" \
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
       "$f" -o "$tmp/$(basename "$f").o" 2>"$tmp/err"; then
    echo "nvcc ok   $f"
  else
    echo "nvcc FAIL $f"; cat "$tmp/err"; status=1
  fi
done
exit $status
