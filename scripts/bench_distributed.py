"""Two multi-process measurements of the online stages (gloo on CPU by default, 2 processes).

``rollout``: tokens/s of ``rollout.generate`` on an FSDP2-sharded policy, per-token gathers (every
forward all-gathers every layer, FSDP2's default) vs gathered once per rollout
(``models.distributed.gathered_once``, what ``OnlineRLModule.generate`` does). Both variants run in
the same processes, alternating, on the same sharded model; every row samples exactly
``--new-tokens`` tokens (no EOS)::

    python scripts/bench_distributed.py rollout                          # the demo model (h128, 4 layers)
    python scripts/bench_distributed.py rollout --hidden 512 --layers 8  # an h512/8-layer Llama

``accumulation``: the optimisation phase of a PPO step (``time/train``) under 2-process DDP through
the Trainer, with ``sync_free_accumulation`` on (one all-reduce per optimiser step) vs off (one per
micro-batch). Runs alternate between the variants; the median over steps after the first::

    python scripts/bench_distributed.py accumulation

Absolute numbers depend on the machine's load; compare the ratio of the variants of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ rollout


def _rollout_worker(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_rlhf.models.distributed import gathered_once, shard_fsdp2
    from lightning_rlhf.rollout import generate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = _model(args)
    shard_fsdp2(model, mesh)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {"per_token": [], "gathered_once": []}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        for name in ("per_token", "gathered_once"):
            dist.barrier()
            t0 = time.perf_counter()
            with gathered_once(model, enabled=name == "gathered_once"):
                out = generate(
                    model, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0,
                    generator=g, sync_stop=True,
                )  # fmt: skip
            dist.barrier()
            assert out.response_mask.sum() == args.batch * args.new_tokens
            if rep:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        tokens = args.batch * args.new_tokens * world
        res = {k: tokens / statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "model": f"h{model.config.hidden_size}/{model.config.num_hidden_layers} layers",
                    "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                    "processes": world,
                    "tokens_per_s": {k: round(v, 1) for k, v in res.items()},
                    "speedup": round(res["gathered_once"] / res["per_token"], 2),
                }
            )
        )
    dist.destroy_process_group()


def _model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlhf.demo.assets import base_model_dir
    from lightning_rlhf.models import load_causal_lm

    if args.hidden is None:
        return load_causal_lm(str(base_model_dir()), trainable=False)
    demo = LlamaConfig.from_pretrained(str(base_model_dir()))
    config = LlamaConfig(
        vocab_size=demo.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def rollout(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    port = 29500 + os.getpid() % 1000
    mp.spawn(_rollout_worker, args=(args.processes, args, port), nprocs=args.processes, join=True)


# ------------------------------------------------------------------------------------- accumulation

ACCUMULATION_RUN = """
import json, statistics, sys, lightning as L
from lightning_rlhf.stages import PPOModule
from lightning_rlhf.data import RLHFDataModule

sync_free, steps, micro, base, prompts = sys.argv[1:6]
L.seed_everything(0)
m = PPOModule(policy=base, critic_init="policy", ppo_epochs=2, mini_batch_size=8, micro_batch_size=int(micro),
              generation={"max_new_tokens": 16}, reward_functions=["lightning_rlhf.demo.rewards.gold_reward"],
              log_samples_every_n_steps=0)
m.sync_free_accumulation = sync_free == "1"
times = []


class Times(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        times.append(float(trainer.callback_metrics["time/train"]))


dm = RLHFDataModule(prompts, batch_size=8, max_prompt_length=32)
t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=int(steps), logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Times()])
t.fit(m, dm)
if t.global_rank == 0:
    print("TIMES", json.dumps(times[1:]), flush=True)
"""


def accumulation(args: argparse.Namespace) -> None:
    import shutil

    from lightning_rlhf.demo.assets import base_model_dir

    prompts = ROOT / "data/demo/reviews/prompts_eval.jsonl"
    times: dict[str, list[float]] = {"sync_free": [], "synced": []}
    with tempfile.TemporaryDirectory() as tmp:
        policy = base_model_dir()
        if args.hidden:  # the demo tokenizer with a wider, deeper Llama config (seeded init)
            policy = Path(tmp) / "policy"
            shutil.copytree(base_model_dir(), policy)
            config = json.loads((policy / "config.json").read_text())
            config.update(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=args.hidden // 128, intermediate_size=args.hidden * 8 // 3)
            (policy / "config.json").write_text(json.dumps(config))
        script = Path(tmp) / "run.py"
        script.write_text(ACCUMULATION_RUN)
        for _ in range(args.repeats):
            for name, flag in (("sync_free", "1"), ("synced", "0")):
                cmd = [sys.executable, str(script), flag, str(args.steps), str(args.micro), str(policy),
                       str(prompts)]  # fmt: skip
                env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
                proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, check=True, timeout=900)
                line = next(x for x in proc.stdout.splitlines() if x.startswith("TIMES"))
                times[name] += json.loads(line.split(" ", 1)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "model": f"{'demo h128/4 layers' if not args.hidden else f'h{args.hidden}/{args.layers} layers'}, "
                "PPO, 2-process DDP",
                "micro_batches_per_step": 8 // args.micro,
                "optimisation_s_per_rollout_step": {k: round(v, 3) for k, v in med.items()},
                "steps_measured": {k: len(v) for k, v in times.items()},
                "speedup": round(med["synced"] / med["sync_free"], 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rollout")
    r.add_argument("--hidden", type=int, default=None, help="a random Llama of this width (default: the demo model)")
    r.add_argument("--layers", type=int, default=8)
    r.add_argument("--batch", type=int, default=8, help="rows per process")
    r.add_argument("--prompt-len", type=int, default=16)
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--processes", type=int, default=2)
    a = sub.add_parser("accumulation")
    a.add_argument("--steps", type=int, default=4, help="rollout steps per run (the first is not timed)")
    a.add_argument("--micro", type=int, default=1, help="micro_batch_size (8 rows per mini-batch)")
    a.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
    a.add_argument("--hidden", type=int, default=None, help="a Llama of this width (default: the demo model)")
    a.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    rollout(args) if args.what == "rollout" else accumulation(args)


if __name__ == "__main__":
    main()
