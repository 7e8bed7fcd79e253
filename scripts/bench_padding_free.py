"""Training- and scoring-phase time of a GRPO / PPO step with and without ``padding_free`` (CPU, fp32).

A synthetic rollout of ``--rows`` rows on a random Llama (default h512/4 layers/V32000): prompts of
``--prompt-min``..``--prompt-max`` tokens (left-padded), responses of ``--max-new-tokens`` tokens, and in
the ``early`` case half the rows (every other one) stopped by EOS at a quarter of that. Per case and
variant (padded / packed), side by side in one process, interleaved over ``--rounds``:

- scoring phase: the no-grad forwards of a step, old log-probs and reference log-probs (the same policy
  twice here) with ``forward_batch_size`` = all rows, and for PPO the critic's values;
- training phase: forward + backward of every micro-batch (``Experience.select``: shuffled rows,
  trimmed to their columns) through the functions the stages call (``Rollout.response_logprobs`` and,
  for PPO, ``sequence_values`` on a separate critic of the same size); the optimiser step is the same
  for both variants and left out.

Reports the median seconds and packed/padded ratios (< 1: packing is faster), and checks that both
variants give the same log-probs. Run with OMP_NUM_THREADS=1 on an otherwise quiet machine:

    OMP_NUM_THREADS=1 python scripts/bench_padding_free.py              # GRPO and PPO, early and full
    OMP_NUM_THREADS=1 python scripts/bench_padding_free.py --stages grpo --rounds 3
    OMP_NUM_THREADS=1 python scripts/bench_padding_free.py --stages dpo --pairs 8   # DPO pair packing

``dpo``: a batch of ``--pairs`` preference pairs (prompts as above, completions of 8..``--max-new-tokens``
tokens), the policy's forward + backward of the shared-prompt rows (``share_prompt``, the default) with
and without packing several of them into one row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from lightning_rlhf.models.value import sequence_values
from lightning_rlhf.rollout import Experience, Rollout
from lightning_rlhf.stages.dpo import DPOModule


def make_rollout(args, early: bool, g: torch.Generator) -> Rollout:
    n, p, r = args.rows, args.prompt_max, args.max_new_tokens
    plen = torch.randint(args.prompt_min, args.prompt_max + 1, (n,), generator=g)
    rlen = torch.full((n,), r)
    if early:
        rlen[::2] = max(1, r // 4)
    col_p, col_r = torch.arange(p), torch.arange(r)
    prompt_mask = (col_p[None] >= (p - plen)[:, None]).long()
    response_mask = (col_r[None] < rlen[:, None]).long()
    return Rollout(
        prompt_ids=torch.randint(1, args.vocab, (n, p), generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(1, args.vocab, (n, r), generator=g) * response_mask,
        response_mask=response_mask,
        logprobs=torch.zeros(n, r),
        finished=rlen < r,
        prompt_index=torch.arange(n),
    )


def scoring(policy, critic, ro: Rollout, padding_free: bool) -> torch.Tensor:
    with torch.no_grad():
        old, _ = ro.response_logprobs(policy, padding_free=padding_free)
        ro.response_logprobs(policy, padding_free=padding_free)  # the reference's forward
        if critic is not None:
            sequence_values(critic, *ro.sequences(), values_to_keep=ro.response_ids.shape[1], padding_free=padding_free)
    return old


def training(policy, critic, ro: Rollout, micro: list[torch.Tensor], padding_free: bool) -> None:
    exp = Experience(ro)
    for idx in micro:
        mb = exp.select(idx).rollout
        lp, ent = mb.response_logprobs(policy, return_entropy=True, padding_free=padding_free)
        loss = -(lp * mb.response_mask).sum() / mb.response_mask.sum() - 0.01 * ent.mean()
        if critic is not None:
            v = sequence_values(critic, *mb.sequences(), values_to_keep=mb.response_ids.shape[1], padding_free=padding_free)
            loss = loss + (v * mb.response_mask).pow(2).mean()
        loss.backward()
    for model in (policy, critic):
        if model is not None:
            model.zero_grad(set_to_none=True)


def make_pairs(args, g: torch.Generator) -> dict:
    """A DPO batch of ``--pairs`` pairs: prompts ``--prompt-min``..``--prompt-max``, completions 8..``--max-new-tokens``
    tokens (uniform), as the collator gives it: 2B right-padded rows, chosen rows first."""
    b = args.pairs
    plen = torch.randint(args.prompt_min, args.prompt_max + 1, (b,), generator=g)
    clen = torch.randint(8, args.max_new_tokens + 1, (2 * b,), generator=g)
    plen2 = plen.repeat(2)
    width = int((plen2 + clen).max())
    col = torch.arange(width)[None]
    attn = (col < (plen2 + clen)[:, None]).long()
    loss = attn * (col >= plen2[:, None]).long()
    ids = torch.randint(1, args.vocab, (2 * b, width), generator=g) * attn
    ids[b:, : args.prompt_max] = torch.where(col[:, : args.prompt_max] < plen[:, None], ids[:b, : args.prompt_max], ids[b:, : args.prompt_max])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def dpo_step(policy, batch: dict, padding_free: bool, packed_length: int | None = None) -> torch.Tensor:
    """The policy's forward + backward of one DPO batch from shared rows, packed or not."""
    module = SimpleNamespace(padding_free=padding_free, packed_length=packed_length)
    sums, _ = DPOModule._shared_completion_logps(module, policy, batch)
    sums.sum().backward()
    policy.zero_grad(set_to_none=True)
    return sums.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages", default="grpo,ppo", help="any of grpo, ppo, dpo (DPO: shared-prompt rows, packed or not)")
    p.add_argument("--pairs", type=int, default=8, help="DPO: pairs per batch")
    p.add_argument("--packed-lengths", default="1,2", help="DPO: packed_length as multiples of the longest shared "
                   "row (1: None, the longest row itself)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024, pad_token_id=0, num_labels=1,
    )  # fmt: skip
    config._attn_implementation = args.attn
    policy = LlamaForCausalLM(config).eval()
    stages = args.stages.split(",")
    critic = LlamaForSequenceClassification(config).eval() if "ppo" in stages else None
    g = torch.Generator().manual_seed(0)
    cases = {"early": make_rollout(args, True, g), "full": make_rollout(args, False, g)}
    perm = torch.randperm(args.rows, generator=g)
    micro = list(perm.split(args.micro_batch))
    results: dict[str, list[float]] = {}
    for name, ro in cases.items():  # same numbers both ways (and a warm-up)
        a, b = scoring(policy, None, ro, False), scoring(policy, None, ro, True)
        diff = float((a - b).abs().max())
        print(f"{name}: max |packed - padded| log-prob {diff:.2e}")
        assert diff < 1e-4, diff
    pairs = make_pairs(args, g) if "dpo" in stages else None
    variants = {}  # DPO: name -> (padding_free, packed_length)
    if pairs is not None:
        longest = int((pairs["attention_mask"].sum(-1)[: args.pairs] + pairs["loss_mask"].sum(-1)[args.pairs :]).max())
        variants = {"padded": (False, None)}
        for m in (float(x) for x in args.packed_lengths.split(",")):
            variants[f"packed-{m:g}x"] = (True, int(m * longest) if m != 1 else None)
        base = dpo_step(policy, pairs, False)
        for name, (pf, length) in variants.items():
            diff = float((dpo_step(policy, pairs, pf, length) - base).abs().max())
            print(f"dpo {name}: max |packed - shared rows| summed log-prob {diff:.2e}")
    for _ in range(args.rounds):
        for name, (pf, length) in variants.items():
            t0 = time.perf_counter()
            dpo_step(policy, pairs, pf, length)
            results.setdefault(f"dpo/{name}", []).append(time.perf_counter() - t0)
        for stage in (s for s in stages if s != "dpo"):
            c = critic if stage == "ppo" else None
            for name, ro in cases.items():
                for pf in (False, True):
                    t0 = time.perf_counter()
                    scoring(policy, c, ro, pf)
                    t1 = time.perf_counter()
                    training(policy, c, ro, micro, pf)
                    t2 = time.perf_counter()
                    key = f"{stage}/{name}/{'packed' if pf else 'padded'}"
                    results.setdefault(f"{key}/score", []).append(t1 - t0)
                    results.setdefault(f"{key}/train", []).append(t2 - t1)
    med = {k: statistics.median(v) for k, v in results.items()}
    tokens = {n: (int(ro.prompt_mask.sum() + ro.response_mask.sum()), ro.prompt_ids.numel() + ro.response_ids.numel())
              for n, ro in cases.items()}  # fmt: skip
    rows = []
    if pairs is not None:
        a = med["dpo/padded"]
        print(f"dpo, {args.pairs} pairs of shared-prompt rows (prompts {args.prompt_min}-{args.prompt_max}, completions "
              f"8-{args.max_new_tokens}, longest row {longest} tokens), h{args.hidden}/{args.layers} layers/V{args.vocab}, "
              f"{args.attn}, policy forward + backward, median of {args.rounds}:")  # fmt: skip
        for name in variants:
            print(f"  {name:12} {med[f'dpo/{name}']:8.3f} s  {med[f'dpo/{name}'] / a:5.2f}x")
            rows.append({"stage": "dpo", "case": name, "phase": "train", "padded_s": a, "packed_s": med[f"dpo/{name}"],
                         "ratio": med[f"dpo/{name}"] / a})  # fmt: skip
    online = [s for s in stages if s != "dpo"]
    if online:
        print(f"\n{args.rows} rows, prompts {args.prompt_min}-{args.prompt_max}, responses {args.max_new_tokens} "
              f"(early: half at {args.max_new_tokens // 4}), micro-batch {args.micro_batch}, h{args.hidden}/"
              f"{args.layers} layers/V{args.vocab}, {args.attn}, {args.rounds} rounds, "
              f"threads {torch.get_num_threads()}")  # fmt: skip
        print(f"{'stage':5} {'case':6} {'real/padded tokens':>19} {'phase':6} {'padded s':>9} {'packed s':>9} {'packed/padded':>14}")
    for stage in online:
        for name in cases:
            for phase in ("score", "train"):
                a, b = med[f"{stage}/{name}/padded/{phase}"], med[f"{stage}/{name}/packed/{phase}"]
                real, padded = tokens[name]
                print(f"{stage:5} {name:6} {real:>8} / {padded:<8} {phase:6} {a:9.3f} {b:9.3f} {b / a:13.2f}x")
                rows.append({"stage": stage, "case": name, "phase": phase, "padded_s": a, "packed_s": b, "ratio": b / a})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "raw": results}, f, indent=1)


if __name__ == "__main__":
    main()
