#!/usr/bin/env bash
# README's main command: install (idempotent) and run the pipeline on the embedded demo task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo "$@"
