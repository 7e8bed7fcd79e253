"""Peak memory of one PPO step for each model layout, each in a fresh process.

    python scripts/bench_ppo_memory.py [--hidden 512 --layers 8 --vocab 32000 --batch 8 --new-tokens 32]

Variants (same random Llama for every role; one rollout + PPO update of `--batch` prompts):

- ``full``: four full models: policy, reference copy, reward model, critic (from the reward model).
- ``lora``: LoRA policy whose reference is the policy with the adapter disabled (no copy); the
  critic is a LoRA'd copy of the reward model.
- ``shared``: full policy + reference + reward model, critic = a value head on the policy backbone.
- ``lora_shared``: LoRA policy (adapter-off reference) + value head + reward model: the least memory.

Reports the peak resident set size (``ru_maxrss``) of each process, and the same minus the RSS
after imports (what the models, activations and optimiser states cost). CPU only.

Each variant is also planned by ``lightning_rlhf.memory`` (``lightning-rlhf plan-memory``: fp32, one
device, the step's micro-batch of ``batch`` rows x prompt + new tokens) and compared with the
training peak: the models are built first (``configure_model``), the high-water mark is then reset
(``/proc/self/clear_refs``) so that loading's transient copies do not count, and ``--steps`` PPO steps
run (2 by default: AdamW's moments exist from the first step on, so the second step's forward holds
weights, moments and activations together, the steady state the planner plans). ``step peak`` is that
high-water mark minus the RSS after imports (peft included).

``--fixed-mmap-threshold`` runs the children with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then serves
every large tensor with its own ``mmap`` and returns it on free. By default glibc raises that threshold
as large blocks are freed and then keeps freed activations in its heap, so the RSS of the LoRA
variants (small gradients that never reuse that memory) grows step after step beyond what is live.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "full": dict(),
    "lora": dict(lora=True),
    "shared": dict(share_backbone=True),
    "lora_shared": dict(lora=True, share_backbone=True),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hwm_mib() -> float:
    """The process's RSS high-water mark since start or since the last ``reset_hwm()``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_models(out: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from lightning_rlhf.demo.assets import tokenizer_dir
    from lightning_rlhf.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(out / "reward")
    for d in ("policy", "reward"):
        tok.save_pretrained(out / d)


def planned_mib(name: str, models: Path, batch: int, seq: int) -> float:
    """The planner's peak for this variant (fp32 on one device; LoRA rank 16 as ``run_variant``)."""
    from lightning_rlhf.memory import ModelShape, Setup, plan

    opts = VARIANTS[name]
    setup = Setup(stage="ppo", dtype="fp32", batch=batch, seq=seq, lora=opts.get("lora", False), lora_r=16,
                  share_backbone=opts.get("share_backbone", False), gpu_memory_gib=1e9)  # fmt: skip
    return plan(ModelShape.load(str(models / "policy")), setup).total / 2**20


def run_variant(name: str, models: Path, batch: int, new_tokens: int, steps: int = 2) -> dict:
    import lightning as L
    import peft  # noqa: F401  (imported by the LoRA variants: count it as an import in every variant)
    import torch

    from lightning_rlhf.data import RLHFDataModule
    from lightning_rlhf.models import LoraSpec, ModelSpec
    from lightning_rlhf.stages import GenerationSpec, PPOModule

    base = current_rss_mib()
    opts = VARIANTS[name]
    policy = ModelSpec(
        path=str(models / "policy"), lora=LoraSpec(r=16, alpha=32) if opts.get("lora") else None
    )
    module = PPOModule(
        policy=policy,
        reward_model=str(models / "reward"),
        share_backbone=opts.get("share_backbone", False),
        generation=GenerationSpec(max_new_tokens=new_tokens),
        ppo_epochs=1,
        mini_batch_size=batch,
        log_samples_every_n_steps=0,
        schedule_steps=1,
    )
    dm = RLHFDataModule("data/demo/reviews/prompts_eval.jsonl", batch_size=batch, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    module.configure_model()  # idempotent: fit's own call then finds the models built
    loaded = current_rss_mib() - base
    reset_hwm()
    trainer.fit(module, dm)
    step_peak = hwm_mib() - base
    prompt_tokens = next(iter(dm.train_dataloader()))["input_ids"].shape[1]
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for m in module._frozen.values() for p in m.parameters())
    return {
        "variant": name,
        "peak_rss_mib": round(rss_mib(), 1),
        "peak_minus_imports_mib": round(rss_mib() - base, 1),
        "trainable_params_m": round(n_trainable / 1e6, 2),
        "frozen_params_m": round(n_frozen / 1e6, 2),
        "reference_copy": module.reference is not None,
        "step_s": round(time.perf_counter() - start, 1),
        "loaded_mib": round(loaded, 1),
        "step_peak_mib": round(step_peak, 1),
        "planned_mib": round(planned_mib(name, models, batch, prompt_tokens + new_tokens), 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="PPO steps (prompt batches) per variant")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument(
        "--fixed-mmap-threshold", action="store_true", help="MALLOC_MMAP_THRESHOLD_=131072 in the children"
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", nargs=2, metavar=("VARIANT", "MODELS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(
            json.dumps(
                run_variant(args._child[0], Path(args._child[1]), args.batch, args.new_tokens, args.steps)
            )
        )
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build_models(Path(tmp), args.hidden, args.layers, args.vocab)
        for name in args.variants:
            cmd = [sys.executable, __file__, "--_child", name, tmp, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)]  # fmt: skip
            env = dict(os.environ, WANDB_MODE="disabled")
            if args.fixed_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"variant {name} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.steps} PPO steps of "
          f"{args.batch} prompts x {args.new_tokens} new tokens (CPU, fp32); MiB"
          f"{'; MALLOC_MMAP_THRESHOLD_=131072' if args.fixed_mmap_threshold else ''}")  # fmt: skip
    print(f"{'variant':<12} {'peak RSS':>9} {'- imports':>10} {'trainable M':>12} {'frozen M':>9} {'loaded':>7} "
          f"{'step peak':>10} {'planned':>8} {'planned/step peak':>18} {'vs full: measured':>18} {'planned':>8}")  # fmt: skip
    full = next((r for r in results if r["variant"] == "full"), results[0])
    for r in results:
        print(f"{r['variant']:<12} {r['peak_rss_mib']:>9.0f} {r['peak_minus_imports_mib']:>10.0f} "
              f"{r['trainable_params_m']:>12.2f} {r['frozen_params_m']:>9.2f} {r['loaded_mib']:>7.0f} "
              f"{r['step_peak_mib']:>10.0f} {r['planned_mib']:>8.0f} {r['planned_mib'] / r['step_peak_mib']:>18.2f} "
              f"{r['step_peak_mib'] / full['step_peak_mib']:>18.2f} {r['planned_mib'] / full['planned_mib']:>8.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
