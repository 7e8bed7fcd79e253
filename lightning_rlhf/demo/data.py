"""Deterministic generator of the demo data sets, in the record formats TRL users have.

``write_demo_data(out_dir)`` writes, for the review task (conversational records):

- ``reviews/sft_{train,val}.jsonl``: ``{"messages": [user, assistant]}``
- ``reviews/pref_{train,val}.jsonl``: ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``
  where chosen has the higher gold reward (ties are not written)
- ``reviews/prompts_{train,eval}.jsonl``: ``{"prompt": [user]}``

for the verifiable sentiment-label task (plain prompt/completion records, used by the demo's GRPO):

- ``sentiment/sft_{train,val}.jsonl``: ``{"prompt", "completion"}`` with 30% wrong labels
- ``sentiment/prompts_{train,eval}.jsonl``: ``{"prompt", "answer"}``

and for a harder verifiable task, reversing a word list (the tiny demo model does not learn it in the
demo's budget; it is there for larger models):

- ``reverse/sft_{train,val}.jsonl``: ``{"prompt", "completion"}`` with noisy answers
- ``reverse/prompts_{train,eval}.jsonl``: ``{"prompt", "answer"}`` (the extra column reaches reward
  functions)

``python -m lightning_rlhf.demo.data [OUT_DIR]`` (default ``data/demo``).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from . import reverse, reviews, sentiment

SIZES = dict(sft_train=3000, sft_val=200, pref_train=3000, pref_val=300, prompts_train=1024, prompts_eval=64)
MIN_PAIR_GAP = 1 / 3  # the gold value of one positive sentence
PAIR_NOISE = dict(repeat_prob=0.25, off_topic_prob=0.15, malformed_prob=0.15, max_sentences=4)
REVERSE_SIZES = dict(sft_train=3000, sft_val=200, prompts_train=1024, prompts_eval=100)
REVERSE_NOISE = 0.4
SENTIMENT_SIZES = dict(sft_train=3000, sft_val=200, prompts_train=1024, prompts_eval=100)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def review_records(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {}
    for split in ("sft_train", "sft_val"):
        recs = []
        for _ in range(SIZES[split]):
            prompt = reviews.sample_prompt(rng)
            response = reviews.sample_response(rng, reviews.product_of(prompt))
            recs.append({"messages": _user(prompt) + _assistant(response)})
        out[split] = recs
    for split in ("pref_train", "pref_val"):
        recs = []
        while len(recs) < SIZES[split]:
            prompt = reviews.sample_prompt(rng)
            # Pairs see repetition, off-topic, malformed and over-long responses more often than SFT data
            # does, so the reward model learns that they are bad (it stays a proxy: it knows only what
            # the pairs show).
            a, b = (reviews.sample_response(rng, reviews.product_of(prompt), **PAIR_NOISE) for _ in range(2))
            ga, gb = reviews.gold_reward(prompt, a), reviews.gold_reward(prompt, b)
            if abs(ga - gb) < MIN_PAIR_GAP:
                continue  # near-ties are coin flips for any judge: like rated data sets, keep clear pairs
            chosen, rejected = (a, b) if ga > gb else (b, a)
            recs.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
        out[split] = recs
    for split in ("prompts_train", "prompts_eval"):
        out[split] = [{"prompt": _user(reviews.sample_prompt(rng))} for _ in range(SIZES[split])]
    return out


def reverse_records(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed + 1)
    out: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split in ("sft_train", "sft_val", "prompts_train", "prompts_eval"):
        recs = []
        while len(recs) < REVERSE_SIZES[split]:
            prompt, words = reverse.sample_prompt(rng)
            if split == "prompts_eval" and prompt in seen:
                continue  # held-out prompts are never seen in training
            seen.add(prompt)
            if split.startswith("sft"):
                recs.append({"prompt": prompt, "completion": " " + reverse.noisy_answer(rng, words, REVERSE_NOISE)})
            else:
                recs.append({"prompt": prompt, "answer": reverse.answer(words)})
        out[split] = recs
    return out


def sentiment_records(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed + 2)
    out: dict[str, list[dict]] = {}
    for split in ("sft_train", "sft_val", "prompts_train", "prompts_eval"):
        recs = []
        for _ in range(SENTIMENT_SIZES[split]):
            prompt, answer = sentiment.sample_prompt(rng)  # 240 distinct prompts: no held-out strings
            if split.startswith("sft"):
                recs.append({"prompt": prompt, "completion": " " + sentiment.noisy_label(rng, answer)})
            else:
                recs.append({"prompt": prompt, "answer": answer})
        out[split] = recs
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_demo_data(out_dir: str | Path = "data/demo", seed: int = 0) -> Path:
    out = Path(out_dir)
    for split, recs in review_records(seed).items():
        write_jsonl(out / "reviews" / f"{split}.jsonl", recs)
    for split, recs in reverse_records(seed).items():
        write_jsonl(out / "reverse" / f"{split}.jsonl", recs)
    for split, recs in sentiment_records(seed).items():
        write_jsonl(out / "sentiment" / f"{split}.jsonl", recs)
    return out


if __name__ == "__main__":
    print(write_demo_data(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
