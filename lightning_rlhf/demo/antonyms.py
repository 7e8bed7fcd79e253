"""A verifiable task for a real pretrained model: name the opposite of a word, in one word.

Used by ``configs/examples/smollm2_grpo_antonyms.yaml`` (GRPO on SmolLM2-135M-Instruct with LoRA).
The base model knows many antonyms but often answers with a wrong word, a phrase or a sentence, so
its accuracy is in the range where RL with an exact-match reward has signal (about 30% at
temperature 1). Each prompt is a short chat: one worked example, then the question (the chat
template adds SmolLM2's default system line)::

    user: What is the opposite of tall? Answer with one word.   assistant: Short
    user: What is the opposite of hot? Answer with one word.

:func:`antonym_reward` scores 1.0 when the reply is one word (case and a trailing full stop ignored)
among the accepted answers (the prompt record's ``answers`` column), else 0.0. Train and held-out
prompts use disjoint word pairs, so the held-out score measures what generalises, not memorisation.

``python -m lightning_rlhf.demo.antonyms [OUT_DIR]`` (default ``data/examples/antonyms``) writes
``prompts_train.jsonl`` and ``prompts_eval.jsonl``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

# (word, opposite, other accepted opposites of word, other accepted opposites of opposite)
PAIRS: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("hot", "cold", ("cool", "chilly"), ("warm",)), ("big", "small", ("little", "tiny"), ("large",)),
    ("up", "down", (), ()), ("fast", "slow", (), ()), ("happy", "sad", ("unhappy",), ()), ("day", "night", (), ()),
    ("open", "closed", ("shut",), ()), ("light", "dark", ("heavy",), ()), ("old", "new", ("young",), ()),
    ("high", "low", (), ()), ("hard", "soft", ("easy",), ()), ("early", "late", (), ()), ("rich", "poor", (), ()),
    ("full", "empty", (), ()), ("win", "lose", (), ()), ("left", "right", (), ()), ("black", "white", (), ()),
    ("wet", "dry", (), ()), ("love", "hate", (), ()), ("start", "finish", ("end", "stop"), ("begin",)),
    ("good", "bad", ("evil",), ()), ("yes", "no", (), ()), ("in", "out", (), ()), ("on", "off", (), ()),
    ("near", "far", (), ()), ("long", "short", (), ()), ("thick", "thin", (), ()), ("strong", "weak", (), ()),
    ("clean", "dirty", (), ()), ("loud", "quiet", ("silent", "soft"), ()), ("true", "false", (), ()),
    ("push", "pull", (), ()), ("buy", "sell", (), ()), ("give", "take", ("receive",), ()), ("alive", "dead", (), ()),
    ("friend", "enemy", ("foe",), ()), ("sweet", "sour", ("bitter", "salty"), ()), ("first", "last", (), ()),
    ("before", "after", (), ()), ("above", "below", ("under", "beneath"), ()), ("inside", "outside", (), ()),
    ("top", "bottom", (), ()), ("front", "back", ("rear",), ()), ("north", "south", (), ()), ("east", "west", (), ()),
    ("summer", "winter", (), ()), ("boy", "girl", (), ()), ("man", "woman", (), ()), ("king", "queen", (), ()),
    ("question", "answer", (), ()), ("wide", "narrow", (), ()), ("deep", "shallow", (), ()),
    ("cheap", "expensive", ("costly", "dear"), ()), ("safe", "dangerous", ("unsafe",), ()),
    ("brave", "cowardly", ("afraid", "scared", "fearful", "timid"), ()), ("remember", "forget", (), ()),
    ("arrive", "leave", ("depart",), ()), ("laugh", "cry", (), ()), ("sick", "healthy", ("well",), ("ill",)),
    ("awake", "asleep", (), ()), ("begin", "end", ("finish",), ("start",)), ("smooth", "rough", (), ()),
    ("polite", "rude", ("impolite",), ()), ("success", "failure", (), ()), ("peace", "war", (), ()),
    ("morning", "evening", ("night",), ()), ("more", "less", ("fewer",), ()), ("always", "never", (), ()),
    ("accept", "reject", ("refuse", "decline"), ()), ("increase", "decrease", ("reduce",), ()),
]  # fmt: skip
EXAMPLE = ("tall", "Short")
N_EVAL_PAIRS = 20


def question(word: str) -> str:
    return f"What is the opposite of {word}? Answer with one word."


def word_of(prompt: list[dict]) -> str:
    """The word asked about in a prompt's last user turn."""
    return re.match(r"What is the opposite of (.+)\?", prompt[-1]["content"]).group(1)


def prompt_messages(word: str) -> list[dict]:
    """The chat prompt for ``word``: one worked example, then the question.

    A shorter prompt (a system line "Answer with one word." and "Opposite of hot?") costs fewer
    tokens, but the base model then answers right only about 7% of the time (against about 30%).
    """
    return [
        {"role": "user", "content": question(EXAMPLE[0])},
        {"role": "assistant", "content": EXAMPLE[1]},
        {"role": "user", "content": question(word)},
    ]


def directed(pairs) -> list[tuple[str, list[str]]]:
    """Both directions of each pair, with their accepted answers."""
    out = []
    for a, b, alts_a, alts_b in pairs:
        out.append((a, [b, *alts_a]))
        out.append((b, [a, *alts_b]))
    return out


def normalise(completion: str) -> str:
    return re.sub(r"[.!]+$", "", completion.strip()).strip().lower()


def is_correct(completion: str, answers: list[str]) -> bool:
    reply = normalise(completion)
    return len(reply.split()) == 1 and reply in {a.lower() for a in answers}


def antonym_reward(prompts: list, completions: list[str], answers: list[list[str]], **_: Any) -> list[float]:
    """1.0 where the completion is one accepted opposite (``answers`` column), else 0.0 (TRL signature)."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answers, strict=True)]


def one_word(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion is a single word (the format asked for, right or wrong), else 0.0."""
    return [float(len(normalise(c).split()) == 1) for c in completions]


def records(seed: int = 0) -> dict[str, list[dict]]:
    """Prompt records ``{"prompt": [messages], "answers": [...]}``; held-out pairs are disjoint from train."""
    rng = random.Random(seed)
    pairs = list(PAIRS)
    rng.shuffle(pairs)
    split = {"prompts_eval": pairs[:N_EVAL_PAIRS], "prompts_train": pairs[N_EVAL_PAIRS:]}
    out = {}
    for name, ps in split.items():
        recs = [{"prompt": prompt_messages(w), "answers": answers} for w, answers in directed(ps)]
        rng.shuffle(recs)
        out[name] = recs
    return out


def write_data(out_dir: str | Path = "data/examples/antonyms", seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in records(seed).items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return out


if __name__ == "__main__":
    print(write_data(*sys.argv[1:2]))
