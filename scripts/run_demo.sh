#!/usr/bin/env bash
# Set up from scratch and run the demo: quantize the packaged reference model, generate, compare with float16.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
python3 examples/demo.py "$@"
