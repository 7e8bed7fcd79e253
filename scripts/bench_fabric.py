"""Seconds per SFT step under the Trainer and under the Fabric runner, side by side in one process
(one process, the demo model and data; both variants alternate so the machine's load hits both).

    OMP_NUM_THREADS=1 python scripts/bench_fabric.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.demo.assets import base_model_dir
from lightning_rlhf.fabric import FabricRunner, build_fabric
from lightning_rlhf.stages import SFTModule


def run(kind: str, steps: int, out: str) -> float:
    lightning.seed_everything(0, verbose=False)
    module = SFTModule(policy=str(base_model_dir()), optim={"learning_rate": 1e-3}, output_dir=out)
    dm = RLHFDataModule("data/demo/reviews/sft_train.jsonl", batch_size=16, max_length=64)
    t0 = time.perf_counter()
    if kind == "trainer":
        lightning.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0).fit(module, dm)  # fmt: skip
    else:
        FabricRunner(build_fabric("cpu", 1), max_steps=steps).fit(module, dm)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    times: dict[str, list[float]] = {"trainer": [], "fabric": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for kind in ("trainer", "fabric") if r % 2 == 0 else ("fabric", "trainer"):
                times[kind].append(run(kind, a.steps, f"{tmp}/{kind}"))
    best = {k: min(v) for k, v in times.items()}
    print(f"s/step (best of {a.repeats}, {a.steps} steps incl. set-up and export): "
          f"trainer {best['trainer']:.4f}, fabric {best['fabric']:.4f}, trainer/fabric = {best['trainer'] / best['fabric']:.2f}")


if __name__ == "__main__":
    main()
