#!/usr/bin/env bash
# README's main command: install (idempotent) and run the pipeline on the embedded demo task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# One thread: the README's figures were made so (thread count changes float summation order), and a
# tiny model on a busy 2-core machine is far slower with two. On an idle machine 2 threads are ~1.6x
# faster: OMP_NUM_THREADS=2 bash scripts/demo.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo "$@"
