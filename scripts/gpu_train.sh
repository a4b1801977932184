#!/usr/bin/env bash
# Train the reference model on the GPU machine (one `run` call; carry: [".cache/reference_corpus"]).
# Needs the train split at .cache/reference_corpus/train.jsonl.gz (python -m qoq_torch.data.build_corpus).
# Trains one model per step count, keeps the best on the validation (calib) split and writes under $OUT:
#   reference_model/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,
#   training_log.json} and log.txt. Copy $OUT/reference_model/* into qoq_torch/data/reference_model/.
set -euo pipefail
OUT=${OUT:-/tmp/qoq_train_out}
STEPS=${STEPS:-600,1200,2400,4800}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd):${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/log.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/log.txt"
python3 examples/train_reference_model.py --out "$OUT/reference_model" --steps "$STEPS" \
  --time-budget "${TIME_BUDGET:-330}" 2>&1 | tee -a "$OUT/log.txt"
ls -la "$OUT/reference_model"
