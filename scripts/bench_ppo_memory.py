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


def run_variant(name: str, models: Path, batch: int, new_tokens: int) -> dict:
    import lightning as L
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
        accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, dm)
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
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", nargs=2, metavar=("VARIANT", "MODELS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(run_variant(args._child[0], Path(args._child[1]), args.batch, args.new_tokens)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build_models(Path(tmp), args.hidden, args.layers, args.vocab)
        for name in args.variants:
            cmd = [sys.executable, __file__, "--_child", name, tmp, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens)]  # fmt: skip
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled")
            )
            if out.returncode != 0:
                sys.exit(f"variant {name} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; one PPO step of {args.batch} "
          f"prompts x {args.new_tokens} new tokens (CPU, fp32)")  # fmt: skip
    print(f"{'variant':<12} {'peak RSS MiB':>13} {'- imports':>10} {'trainable M':>12} {'frozen M':>9}")
    for r in results:
        print(f"{r['variant']:<12} {r['peak_rss_mib']:>13.0f} {r['peak_minus_imports_mib']:>10.0f} "
              f"{r['trainable_params_m']:>12.2f} {r['frozen_params_m']:>9.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
