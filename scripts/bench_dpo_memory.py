"""Peak memory of DPO training with each kind of reference, on the same model.

    python scripts/bench_dpo_memory.py [--hidden 512 --layers 8 --vocab 32000 --batch 8 --seq 256 --steps 3]

Variants (each in a fresh subprocess, so one's allocations never count towards another's peak):

- ``copy``: full fine-tuning against a frozen copy of the model (two models in memory).
- ``precompute``: full fine-tuning; reference log-probs computed once over the data, then the
  reference freed (``precompute_ref_logps: true``).
- ``lora``: LoRA policy; the reference is the same weights with the adapter disabled.
- ``simpo``: full fine-tuning with a reference-free loss (no reference at all): the floor for the
  full-model variants.

The model is a Llama built from config (random weights, fp32, no download); batches are random
token ids, ``batch`` pairs of ``seq`` tokens (the first quarter prompt). Peak memory is the process's
resident-set high-water mark (``ru_maxrss``) after the training steps, measured on CPU. Prints a
table with each variant's peak, its ratio to ``copy``, and seconds per step, and the memory
planner's figure for the variant (``lightning_rlhf.memory``, fp32, one device) as planned / net.
Run it with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment to have glibc return freed
activations (see ``bench_ppo_memory.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = ("copy", "precompute", "lora", "simpo")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batches(args, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.seq
    prompt = t // 4
    out = []
    for step in range(args.steps):
        ids = torch.randint(3, vocab, (2 * b, t), generator=g)
        ids[b:, :prompt] = ids[:b, :prompt]  # chosen and rejected share their prompt
        loss_mask = torch.zeros(2 * b, t, dtype=torch.long)
        loss_mask[:, prompt:] = 1
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
                "position_ids": torch.arange(t).expand(2 * b, t).clone(),
                "loss_mask": loss_mask,
                "margin": torch.zeros(b),
                "index": torch.arange(step * b, (step + 1) * b),
            }
        )
    return out


def worker(args) -> dict:
    """One variant in this process: build, (precompute,) train ``steps`` steps, report the peak."""
    import torch
    from transformers import LlamaConfig

    from lightning_rlhf.demo.assets import tokenizer_dir
    from lightning_rlhf.models import LoraSpec, ModelSpec
    from lightning_rlhf.stages import DPOModule
    from lightning_rlhf.stages.common import OptimSpec

    torch.set_num_threads(args.threads)
    variant = args.worker
    baseline = _peak_rss_mib()  # the interpreter and libraries, before any model
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)  # config only: the loader builds it with a fixed seed
        spec = ModelSpec(path=tmp, lora=LoraSpec(r=16, alpha=32) if variant == "lora" else None)
        module = DPOModule(
            spec,
            tokenizer=str(tokenizer_dir()),
            optim=OptimSpec(learning_rate=1e-5, scheduler="constant"),
            loss_type="simpo" if variant == "simpo" else "sigmoid",
            precompute_ref_logps=variant == "precompute",
        )
        batches = _batches(args, args.vocab)
        module.configure_model()
        after_load = _peak_rss_mib()
        if variant == "precompute":
            module.precompute_reference_logps({"train": batches})
        optimizer = module.configure_optimizers()["optimizer"]
        n_params = sum(p.numel() for p in module.policy.parameters())
        n_trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
        times, losses = [], []
        for batch in batches:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = module._loss(batch, "train")
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    from lightning_rlhf.memory import ModelShape, Setup, plan

    setup = Setup(stage="dpo", dtype="fp32", batch=args.batch, seq=args.seq, lora=variant == "lora", lora_r=16,
                  precompute_ref=variant in ("precompute", "simpo"))  # fmt: skip
    planned = plan(ModelShape.from_config(config.to_dict()), setup).total / 2**20
    return {
        "variant": variant,
        "planned_mib": planned,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_mib": baseline,
        "peak_after_load_mib": after_load,
        "reference_in_memory": module.reference is not None or variant == "lora",
        "params_m": n_params / 1e6,
        "trainable_m": n_trainable / 1e6,
        "s_per_step": sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0],
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step (2x rows)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return []

    results = []
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq", "steps", "threads")
    ]
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, f"--worker={variant}", *passthrough]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false")
        )
        if proc.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: {results[-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)

    base = next((r["peak_rss_mib"] for r in results if r["variant"] == "copy"), results[0]["peak_rss_mib"])
    print(
        f"Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.batch} pairs x {args.seq} "
        f"tokens, {args.steps} steps, fp32, CPU ({results[0]['params_m']:.1f}M params)"
    )
    net_base = next((r["peak_rss_mib"] - r["baseline_mib"] for r in results if r["variant"] == "copy"), None)
    print(
        f"{'variant':<12}{'reference':<20}{'trainable':>10}{'peak RSS MiB':>14}{'vs copy':>9}"
        f"{'net MiB':>9}{'vs copy':>9}{'s/step':>8}{'planned':>9}{'planned/net':>12}"
    )
    refs = {
        "copy": "frozen copy",
        "precompute": "cached, freed",
        "lora": "adapter disabled",
        "simpo": "none (simpo)",
    }
    for r in results:
        net = r["peak_rss_mib"] - r["baseline_mib"]
        print(
            f"{r['variant']:<12}{refs[r['variant']]:<20}{r['trainable_m']:>9.1f}M{r['peak_rss_mib']:>14.0f}"
            f"{r['peak_rss_mib'] / base:>9.2f}{net:>9.0f}{net / (net_base or net):>9.2f}{r['s_per_step']:>8.1f}"
            f"{r['planned_mib']:>9.0f}{r['planned_mib'] / net:>12.2f}"
        )
    print("net = peak minus the process's RSS after imports (interpreter, torch, transformers)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
