#!/usr/bin/env bash
# One command for whoever has a GPU: every stage briefly on CUDA (bf16-mixed), with LoRA and QLoRA,
# the evaluation callback and the pipeline; one line per check (PASS/FAIL/SKIP + seconds).
#
#   bash scripts/gpu_check.sh                      # CUDA
#   bash scripts/gpu_check.sh --device cpu --only sft,dpo-lora   # the CPU dry run CI uses
#
# Works on a bare GPU box that has torch + lightning + transformers + peft: the stages are driven from
# Python (no jsonargparse / wandb needed). Missing optional packages (bitsandbytes for QLoRA,
# jsonargparse + wandb for the CLI pipeline) are installed from wheels in $WHEELS (default: wheels/)
# when that folder exists, never from the network; otherwise those checks print SKIP with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${WHEELS:-wheels}
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -d "$WHEELS" ]; then
  for pkg in bitsandbytes jsonargparse wandb; do
    if ! "$PY" -c "import $pkg" 2>/dev/null; then
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$pkg" \
        && echo "# installed $pkg from $WHEELS" || echo "# $pkg: no usable wheel in $WHEELS"
    fi
  done
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py "$@"
