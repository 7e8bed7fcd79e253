"""SFT steps per second of the demo model with 1 intra-op thread vs PyTorch's default (one per core).

    python scripts/bench_threads.py [--steps 30] [--rounds 2]

Each variant runs in a fresh process (OMP_NUM_THREADS set before torch loads), alternating, so that the
machine's load hits both alike; prints the median steps/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.stages import SFTModule
steps = int(sys.argv[1])
model_dir = "lightning_rlhf/demo/assets/tiny-llama"
module = SFTModule(policy=model_dir)
module.configure_model()
dm = RLHFDataModule("data/demo/reviews/sft_train.jsonl", kind="sft", tokenizer=model_dir, batch_size=16,
                    max_length=64, packing=True)
dm.setup("fit")
opt = module.configure_optimizers()["optimizer"]
batches = iter(dm.train_dataloader())
def step(i):
    loss = module.training_step(next(batches), i)
    loss.backward(); opt.step(); opt.zero_grad()
step(0)
t0 = time.perf_counter()
for i in range(1, steps + 1):
    step(i)
print(json.dumps({"threads": torch.get_num_threads(), "steps_per_s": steps / (time.perf_counter() - t0)}))
"""


def run(threads: str | None, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    res: dict[str, list[float]] = {"1": [], "default": []}
    n_default = None
    for _ in range(args.rounds):
        for key in ("1", "default"):
            r = run(key if key == "1" else None, args.steps)
            res[key].append(r["steps_per_s"])
            if key == "default":
                n_default = r["threads"]
    one, default = statistics.median(res["1"]), statistics.median(res["default"])
    print(f"OMP_NUM_THREADS=1: {one:.2f} steps/s; default ({n_default} threads): {default:.2f} steps/s; "
          f"ratio 1-thread / default = {one / default:.2f}x  (runs: {res})")


if __name__ == "__main__":
    main()
