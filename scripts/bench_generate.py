"""Tokens/s of `lightning_rlhf.rollout.generate` (own loop, KV cache) vs transformers' `model.generate`.

Both sample (temperature 1, no top-k/top-p) exactly `--new-tokens` tokens per row (no EOS) from the
same randomly initialised Llama and the same ragged prompt batch.

    .venv/bin/python scripts/bench_generate.py            # CPU defaults: hidden 256, 4 layers, vocab 1000
    .venv/bin/python scripts/bench_generate.py --device cuda --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.rollout import generate, left_pad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        intermediate_size=4 * args.hidden,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g)
    mask = (torch.arange(args.prompt_len)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0).to(args.device)  # right-padded, as the data layer gives them
    mask = mask.to(args.device)
    left_ids, left_mask = left_pad(ids, mask, pad_token_id=0)  # transformers wants left padding

    def ours() -> int:
        r = generate(model, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=0)
        return int(r.response_mask.sum())

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=left_ids,
                attention_mask=left_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        return (out.shape[1] - left_ids.shape[1]) * out.shape[0]

    def once(fn) -> tuple[float, int]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, n

    ours(), hf()  # warm-up
    # interleaved, so that load from other processes hits both alike
    runs = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        runs["ours"].append(once(ours))
        runs["hf"].append(once(hf))
    t_ours, n_ours = statistics.median(t for t, _ in runs["ours"]), runs["ours"][0][1]
    t_hf, n_hf = statistics.median(t for t, _ in runs["hf"]), runs["hf"][0][1]
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype} on {args.device} "
        f"({torch.get_num_threads()} threads); batch {args.batch}, prompts {int(lengths.min())}-{args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens; median of {args.repeats}"
    )
    print(f"lightning_rlhf.generate : {n_ours / t_ours:9.0f} tokens/s  ({t_ours * 1000:.0f} ms, {n_ours} tokens)")
    print(f"transformers generate   : {n_hf / t_hf:9.0f} tokens/s  ({t_hf * 1000:.0f} ms, {n_hf} tokens)")
    print(f"ratio ours / transformers: {(n_ours / t_ours) / (n_hf / t_hf):.2f}x")


if __name__ == "__main__":
    main()
