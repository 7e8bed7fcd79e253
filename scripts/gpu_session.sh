#!/usr/bin/env bash
# Everything this project checks on a GPU, in one command with a time budget per part, for a short
# GPU lease (README "GPU"): the CUDA smoke test of every stage, the comparisons against TRL at the
# issue's H100 size, and the sampler's tokens/s.
#
#   bash scripts/gpu_session.sh [generate,sft,check,dpo,reward]     # default: these, in this order
#   bash scripts/gpu_session.sh kernels     # also: regional torch.compile of SFT / reward model (train_kernels.py)
#
# Optional wheels for packages a bare GPU box lacks (trl, datasets, jsonargparse, bitsandbytes, ...) are
# taken from .whl/ when that folder exists (pip install --no-deps --target /tmp/site, never from the
# network). Logs and JSON results go to $OUT (default /tmp/gpu_session), packed as results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${1:-generate,sft,check,dpo,reward}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT/work"
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG="$OUT/session.log"
say() { echo "### $(date +%T) $*" | tee -a "$LOG"; }
run() {  # run <seconds> <name> <command...>: bounded, logged, never fatal
  local secs=$1 name=$2; shift 2
  say "$name: $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >"$OUT/work/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/work/$name.log" | tee -a "$LOG"
  say "$name: rc $rc in $((SECONDS - t0)) s"
}

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, transformers, lightning, peft, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__, 'pyarrow', pyarrow.__version__)"
  "$PYTHON" -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tail -n 5 | tee -a "$LOG"

B=(--device cuda --precision bf16-mixed --size large --rounds 1 --warmup 2 --steps 5 --out "$OUT/work/bench")
for part in ${PARTS//,/ }; do
  case $part in
    generate) run 200 generate "$PYTHON" scripts/bench_generate.py --preset h100-886m --budget-s 180 \
                --out "$OUT/work/bench_generate.json" ;;
    check) run 120 gpu_check bash scripts/gpu_check.sh ;;
    sft) run 110 bench_sft "$PYTHON" scripts/bench/sft.py "${B[@]}" --batch 16 --seq 1024 ;;
    dpo) run 95 bench_dpo "$PYTHON" scripts/bench/dpo.py "${B[@]}" --batch 8 --seq 512 ;;
    reward) run 85 bench_reward "$PYTHON" scripts/bench/reward.py "${B[@]}" --batch 8 --seq 512 ;;
    kernels) run 180 train_kernels "$PYTHON" scripts/bench/train_kernels.py "${B[@]}" --batch 8 --seq 512 \
                --tasks sft,reward --variants sdpa,compile ;;
    *) say "unknown part $part (generate, check, sft, dpo, reward, kernels)" ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$OUT" work 2>/dev/null
rm -rf "$OUT/work"
say "done"
