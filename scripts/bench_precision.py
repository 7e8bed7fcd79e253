"""Training-step speed of fp32 vs bf16 on this CPU, side by side in one process.

    python scripts/bench_precision.py [--threads 2]

For the demo model (hidden 128) and a mid-size Llama (hidden 512, 8 layers, vocab 32000) it times
forward+backward+AdamW steps of SFT-shaped batches in three modes: fp32, bf16 autocast over fp32
weights (Lightning's ``precision="bf16-mixed"``) and bf16 weights (``ModelSpec.dtype: bfloat16``,
``precision="bf16-true"``). Modes alternate, the median of several rounds is kept, and the table
gives the ratio to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.core import sft_loss


def make(hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


def step_time(model, batch, autocast: bool, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = sft_loss(logits, batch, torch.ones_like(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"demo (h128, 4 layers, V81)": (128, 4, 81, 16, 64), "mid (h512, 8 layers, V32000)": (512, 8, 32000, 4, 256)}
    print(f"threads={args.threads}")
    print(f"{'model':<30} {'mode':<12} {'s/step':>8} {'vs fp32':>8}")
    for name, (h, layers, v, b, t) in shapes.items():
        batch = torch.randint(0, v, (b, t))
        models = {"fp32": (make(h, layers, v, torch.float32), False),
                  "bf16-mixed": (make(h, layers, v, torch.float32), True),
                  "bf16-true": (make(h, layers, v, torch.bfloat16), False)}
        res: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for mode, (model, ac) in models.items():
                res[mode].append(step_time(model, batch, ac, steps=4))
        base = statistics.median(res["fp32"])
        for mode, ts in res.items():
            m = statistics.median(ts)
            print(f"{name:<30} {mode:<12} {m:8.3f} {base / m:7.2f}x")


if __name__ == "__main__":
    main()
