"""Cost of the non-finite check of the online stages (loss flag + gradient scan + the agreed decision,
``OnlineRLModule.skip_nonfinite_step``) in PPO's optimisation phase, on the demo model.

    OMP_NUM_THREADS=1 python scripts/bench_nonfinite.py [--rollouts 4] [--rounds 3]

Variants alternate in one process (``check``: as shipped; ``off``: the check replaced by ``False``), each a
fresh PPOModule fitted for ``--rollouts`` rollout steps. Prints the median ``time/train`` per rollout step of
each (the optimisation phase: every mini-batch's forwards, backwards and optimiser steps) and the ratio.
Then, on the same model's gradients, the milliseconds of the gradient scan (``common.grads_finite``, a total
norm), of the per-tensor ``isfinite`` scan it replaced, and of one AdamW step for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning as L
import torch

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.demo.assets import base_model_dir
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.stages import PPOModule
from lightning_rlhf.stages.common import grads_finite
from lightning_rlhf.stages.online import OnlineRLModule

PROMPTS = "data/demo/reviews/prompts_eval.jsonl"


class TrainTime(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, module, *args):
        self.times.append(float(trainer.callback_metrics["time/train"]))


def run(variant: str, rollouts: int) -> list[float]:
    shipped = OnlineRLModule.skip_nonfinite_step
    if variant == "off":
        OnlineRLModule.skip_nonfinite_step = lambda self, *a: False
    try:
        L.seed_everything(0)
        m = PPOModule(policy=str(base_model_dir()), reward_functions=["lightning_rlhf.demo.rewards.gold_reward"],
                      generation={"max_new_tokens": 16}, ppo_epochs=2, mini_batch_size=4, log_samples_every_n_steps=0)
        cb = TrainTime()
        t = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=rollouts, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb])
        t.fit(m, RLHFDataModule(PROMPTS, batch_size=8, max_prompt_length=32))
        return cb.times[1:]  # the first rollout step warms up
    finally:
        OnlineRLModule.skip_nonfinite_step = shipped


def scan_costs(reps: int = 50) -> dict[str, float]:
    params = list(load_causal_lm(str(base_model_dir())).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3)
    variants = {
        "total_norm_scan": lambda: grads_finite(params),
        "isfinite_per_tensor": lambda: bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all()),
        "adamw_step": opt.step,
    }
    out = {}
    for name, f in variants.items():
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out[name] = (time.perf_counter() - t0) / reps * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    times = {"check": [], "off": []}
    for _ in range(args.rounds):
        for variant in times:
            times[variant] += run(variant, args.rollouts)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"median_train_s": med, "ratio_check_over_off": med["check"] / med["off"],
                      "samples": {k: len(v) for k, v in times.items()}, "scan_ms": scan_costs()}))


if __name__ == "__main__":
    main()
