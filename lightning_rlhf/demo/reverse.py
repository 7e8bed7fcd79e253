"""A verifiable demo task for critic-free RL: reverse a short list of words.

The prompt ``reverse : red cat sun =`` has exactly one right answer, ``sun cat red``, which
:func:`exact_match` checks. The SFT data teaches the format but is noisy on purpose (a share of its
answers are near misses: two words swapped, or the list copied), so the SFT model is right only part
of the time and RL with an exact-match reward has something to fix.
"""

from __future__ import annotations

import random

WORDS = ["red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "star"]
PREFIX = ["reverse", ":"]
SUFFIX = ["="]
VOCAB = sorted(set(WORDS) | set(PREFIX) | set(SUFFIX))


def sample_prompt(rng: random.Random, min_len: int = 3, max_len: int = 5) -> tuple[str, list[str]]:
    words = rng.sample(WORDS, rng.randint(min_len, max_len))
    return " ".join(PREFIX + words + SUFFIX), words


def answer(words: list[str]) -> str:
    return " ".join(reversed(words))


def noisy_answer(rng: random.Random, words: list[str], noise: float) -> str:
    """The right answer, or with probability ``noise`` a near miss."""
    target = list(reversed(words))
    if rng.random() >= noise:
        return " ".join(target)
    if rng.random() < 0.3:
        return " ".join(words)  # copied instead of reversed
    i, j = rng.sample(range(len(target)), 2)
    target[i], target[j] = target[j], target[i]
    return " ".join(target)


def words_of(prompt: str) -> list[str]:
    toks = [t for t in prompt.split() if t not in PREFIX and t not in SUFFIX]
    return toks


def exact_match(prompt: str, completion: str) -> float:
    """1.0 if ``completion`` is exactly the reversed word list (whitespace-insensitive), else 0.0."""
    return float(completion.split() == list(reversed(words_of(prompt))))
