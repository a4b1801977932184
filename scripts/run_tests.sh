#!/usr/bin/env bash
# Set up from scratch, compile-check every CUDA file (when nvcc exists), and run the test suite.
# GPU tests are marked `cuda` and skip on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/nvcc_check.sh
python3 -m pytest -q "$@"
