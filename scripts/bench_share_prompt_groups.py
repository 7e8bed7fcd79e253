"""GRPO's ``share_prompt``: the policy's training forward + backward of one micro-batch of prompt groups,
one row ``[prompt, r_1, ..., r_G]`` per group vs the separate rows (CPU, fp32), for a few shapes.

A synthetic rollout of ``--groups`` prompts x G samples (prompt of P tokens, responses of R tokens) on a
random Llama (default h512/8 layers/V32000, the GRPO benchmark's model), rows shuffled. Per shape, both
variants side by side in one process, interleaved over ``--rounds``; reports the median seconds, the
ratio shared/separate (< 1: sharing is faster) and the largest log-prob difference. Run on a quiet
machine:

    OMP_NUM_THREADS=1 python scripts/bench_share_prompt_groups.py
    OMP_NUM_THREADS=1 python scripts/bench_share_prompt_groups.py --shapes 32x4x32,128x4x32 --rounds 5

Shapes are ``PxGxR``. The layers run ``P + G*R`` tokens per group instead of ``G*(P + R)``; the attention
takes a dense ``(P + G*R)^2`` mask, which is what limits the gain for many long responses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.rollout import Rollout


def make_rollout(groups: int, p: int, g: int, r: int, vocab: int, gen: torch.Generator) -> Rollout:
    n = groups * g
    prompts = torch.randint(1, vocab, (groups, p), generator=gen).repeat_interleave(g, 0)
    perm = torch.randperm(n, generator=gen)  # shuffled rows, as a mini-batch
    return Rollout(
        prompt_ids=prompts[perm],
        prompt_mask=torch.ones(n, p, dtype=torch.long),
        response_ids=torch.randint(1, vocab, (n, r), generator=gen),
        response_mask=torch.ones(n, r, dtype=torch.long),
        logprobs=torch.zeros(n, r),
        finished=torch.zeros(n, dtype=torch.bool),
        prompt_index=perm // g,
    )


def step(model, ro: Rollout, share: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    lp, ent = ro.response_logprobs(model, 1.0, return_entropy=True, share_prompt=share)
    (lp.sum() + 0.01 * ent.sum()).backward()
    return time.perf_counter() - t0, lp.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="32x4x32,128x4x32,32x8x128", help="comma-separated PxGxR")
    ap.add_argument("--groups", type=int, default=2, help="prompt groups per micro-batch")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").float().train()
    gen = torch.Generator().manual_seed(0)
    print("| P x G x R | tokens separate / shared | separate s | shared s | shared/separate | max |dlogp| |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        p, g, r = (int(x) for x in shape.split("x"))
        ro = make_rollout(args.groups, p, g, r, args.vocab, gen)
        step(model, ro, True), step(model, ro, False)  # warm-up
        times = {False: [], True: []}
        diff = 0.0
        for _ in range(args.rounds):
            a, lp_sep = step(model, ro, False)
            b, lp_sh = step(model, ro, True)
            times[False].append(a)
            times[True].append(b)
            diff = max(diff, float((lp_sep - lp_sh).abs().max()))
        sep, sh = statistics.median(times[False]), statistics.median(times[True])
        tokens = f"{args.groups * g * (p + r)} / {args.groups * (p + g * r)}"
        print(f"| {shape} | {tokens} | {sep:.3f} | {sh:.3f} | {sh / sep:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
