"""``lightning-rlhf generate``: read what a trained model writes.

    lightning-rlhf generate --model outputs/demo/ppo --prompt "Write a review of the kettle." [--num_samples 4]

The prompt goes through the model's chat template (as one user message) when the tokenizer has one,
``--raw`` feeds it as plain text. Sampling uses the same generator as training's rollouts
(``lightning_rlhf.rollout.generate``) with the options below; ``--seed`` makes it reproducible.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-rlhf generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (any stage's output) or a Hub id in the cache")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat the option for several); '-' reads one prompt per line from stdin")
    p.add_argument("--system", default=None, help="a system message before the prompt (chat template only)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--num_samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--seed", type=int, default=0)
    return p


def generate_text(model_dir: str, prompts: list[str], *, system: str | None = None, raw: bool = False,
                  max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  num_samples: int = 1, seed: int = 0) -> list[list[str]]:
    """``num_samples`` responses for each prompt (a list per prompt)."""
    import torch

    from .data import Encoder
    from .errors import ConfigError, check_model_path
    from .models import load_causal_lm, load_tokenizer
    from .rollout.generate import generate

    for name, value, ok in (("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                            ("temperature", temperature, temperature >= 0),
                            ("top_k", top_k, top_k >= 0), ("top_p", top_p, 0 < top_p <= 1),
                            ("num_samples", num_samples, num_samples >= 1)):
        if not ok:
            raise ConfigError(f"--{name}: {value} is out of range")
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("--prompt: a prompt is empty")
    check_model_path(model_dir, "--model")
    tokenizer = load_tokenizer(model_dir)
    enc = Encoder(tokenizer)
    use_chat = not raw and getattr(tokenizer, "chat_template", None) is not None
    rows = []
    for p in prompts:
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            rows.append(enc.prompt(messages))
        else:
            rows.append(enc.prompt(p))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    model = load_causal_lm(model_dir, trainable=False)
    device = next(model.parameters()).device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    rollout = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, num_samples=num_samples, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                       generator=torch.Generator(device=device).manual_seed(seed))
    texts = rollout.decode_responses(tokenizer)
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.prompt == ["-"] else args.prompt
    out = generate_text(args.model, prompts, system=args.system, raw=args.raw, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        num_samples=args.num_samples, seed=args.seed)
    for prompt, responses in zip(prompts, out, strict=True):
        print(f"### prompt: {prompt}")
        for i, r in enumerate(responses):
            print(f"--- sample {i + 1}:" if len(responses) > 1 else "---")
            print(r)
        print()
