#!/usr/bin/env bash
# Train the reference model on the GPU machine (one `run` call; carry: [".cache/reference_corpus"]).
# Needs the train split at .cache/reference_corpus/train.jsonl.gz (python -m qoq_torch.data.build_corpus).
# Trains one model per step count, keeps the best on the validation (calib) split and writes under $OUT:
#   reference_model/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,
#   training_log.json} and log.txt. Copy $OUT/reference_model/* into qoq_torch/data/reference_model/.
#
# Environment (unset: the shipped reference model's setting):
#   CORPUS=DIR            a build_corpus directory: its train/calib/eval splits and DIR/tokenizer (carry DIR)
#   TOKENIZER=DIR         tokenizer directory (overrides CORPUS's)
#   HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE   model size (--hidden-size --layers --heads --kv-heads
#                         --intermediate-size); the vocabulary size comes from the tokenizer
#   STEPS TIME_BUDGET EXTRA_ARGS                step counts, seconds for all of them, other options
# A model with a file over 16 MiB (what one file back from $OUT may be) comes back as
# $OUT/reference_model.tar.gz.part-NN (15 MiB each; `cat reference_model.tar.gz.part-* | tar xzf -`)
# plus $OUT/training_log.json. The shipped model (python + linux corpus; carry: [".cache/reference_corpus_v2"]):
#   CORPUS=.cache/reference_corpus_v2 HIDDEN=384 LAYERS=6 HEADS=6 KV_HEADS=2 INTERMEDIATE=1024 \
#     STEPS=1500,3000,4500 TIME_BUDGET=340 bash scripts/gpu_train.sh
set -euo pipefail
OUT=${OUT:-/tmp/qoq_train_out}
STEPS=${STEPS:-600,1200,2400,4800}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd):${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
args=(--out "$OUT/reference_model" --steps "$STEPS" --time-budget "${TIME_BUDGET:-330}")
[[ -n "${CORPUS:-}" ]] && args+=(--corpus "$CORPUS")
[[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer "$TOKENIZER")
[[ -n "${HIDDEN:-}" ]] && args+=(--hidden-size "$HIDDEN")
[[ -n "${LAYERS:-}" ]] && args+=(--layers "$LAYERS")
[[ -n "${HEADS:-}" ]] && args+=(--heads "$HEADS")
[[ -n "${KV_HEADS:-}" ]] && args+=(--kv-heads "$KV_HEADS")
[[ -n "${INTERMEDIATE:-}" ]] && args+=(--intermediate-size "$INTERMEDIATE")
read -r -a extra <<< "${EXTRA_ARGS:-}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/log.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/log.txt"
echo "train_reference_model.py ${args[*]} ${extra[*]}" | tee -a "$OUT/log.txt"
start=$SECONDS
python3 examples/train_reference_model.py "${args[@]}" "${extra[@]}" 2>&1 | tee -a "$OUT/log.txt"
{ grep '^run steps=' "$OUT/log.txt" || true; echo "total: $((SECONDS - start)) s"; } | tee -a "$OUT/log.txt"
ls -la "$OUT/reference_model"
if [[ -n "$(find "$OUT/reference_model" -type f -size +16383k)" ]]; then
  cp "$OUT/reference_model/training_log.json" "$OUT/"
  tar -C "$OUT" -czf - reference_model | split -b 15m -d - "$OUT/reference_model.tar.gz.part-"
  rm -r "$OUT/reference_model"
  ls -la "$OUT"
fi
