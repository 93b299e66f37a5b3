#!/usr/bin/env bash
# The README's first command: set up .venv, then a real (small) pretraining run end to end:
#   tokenizer + webdataset shards from the Python standard library's source (no download),
#   train a hybrid paragru + deltaproduct + attention model, stop at a checkpoint, resume,
#   export safetensors, reload the export, sample from it with the recurrent cache, print the
#   held-out perplexity and bits per byte, and a summary.
# Extra arguments are config overrides for both training runs, e.g. `bash launch/smoke.sh train.max_steps=100`.
# SMOKE_MAX_BYTES (default 6000000) bounds the corpus; SMOKE_MIN_DROP (default 0.4) is the loss drop
# the final report requires (tests/test_readme.py runs a toy-size smoke with both lowered).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

CONFIG=configs/smoke.yaml
RUN_DIR=runs/smoke
DATA_DIR=runs/data/smoke
MAX_STEPS=$(python -c "from pretrain.config import load_config; import sys; print(load_config('$CONFIG', sys.argv[1:]).train.max_steps)" "$@")
HALF=$((MAX_STEPS / 2))

echo "== 1/5 data: tokenizer + token shards from the Python standard library"
python -m launch.prepare_data --out "$DATA_DIR" --vocab-size 1024 --max-bytes "${SMOKE_MAX_BYTES:-6000000}" \
    --shard-tokens 262144 --val-fraction 0.02 --workers 2 --overwrite

echo "== 2/5 train steps 0..$HALF, then stop with a checkpoint"
rm -rf "$RUN_DIR"
python -m launch.train --config "$CONFIG" train.run_dir="$RUN_DIR" data.path="$DATA_DIR" train.stop_at="$HALF" "$@"

echo "== 3/5 resume from the checkpoint and continue to step $MAX_STEPS"
python -m launch.train --config "$CONFIG" train.run_dir="$RUN_DIR" data.path="$DATA_DIR" train.resume=auto "$@"

echo "== 4/5 export to safetensors"
python -m launch.export --checkpoint "$RUN_DIR" --out "$RUN_DIR/export"

echo "== 5/5 reload the export, sample (recurrent decoding) and evaluate on the held-out split"
python -m launch.generate --export "$RUN_DIR/export" --prompt "def " --max-new-tokens 48
python -m launch.eval --model "$RUN_DIR/export" --data "$DATA_DIR" --split val --seq-len 256 --json "$RUN_DIR/eval.json"
python -m launch.report --run-dir "$RUN_DIR" --export "$RUN_DIR/export" --min-drop "${SMOKE_MIN_DROP:-0.4}"
