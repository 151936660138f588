#!/usr/bin/env bash
# Fine-tune and prune MiniLM-L6 on a BBC News slice with the STOCK SparseML Hugging Face command.
# Usage: integrations/huggingface/train_bbc.sh [OUT_DIR]   (run with the project's venv on PATH)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-runs/hf-example}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 NM_DISABLE_ANALYTICS=1

# 1. data: train/validation/test CSVs with columns sentence,label (label names)
obert data prepare bbc --out "$OUT/data" --max-train 480 --max-eval 100

# 2. the bundled MiniLM-L6 (a plain Hugging Face folder inside its package)
MODEL="$(python -c 'from obert_modifiers.models import minilm_l6_dir; print(minilm_l6_dir())')"

# 3. the stock console script; the recipe's EpochRangeModifier sets the epochs
sparseml.transformers.train.text_classification \
  --model_name_or_path "$MODEL" \
  --train_file "$OUT/data/train.csv" --validation_file "$OUT/data/validation.csv" \
  --do_train --do_eval --max_seq_length 64 \
  --per_device_train_batch_size 16 --per_device_eval_batch_size 50 \
  --learning_rate 1e-4 --seed 0 \
  --output_dir "$OUT/model" --overwrite_output_dir --report_to none \
  --save_strategy no --save_safetensors False \
  --recipe "$HERE/recipe.yaml"

python - "$OUT/model" <<'PY'
import json, sys
metrics = json.load(open(f"{sys.argv[1]}/eval_results.json"))
print(f"validation accuracy {metrics['eval_accuracy']:.3f} (majority class about 0.24)")
PY
