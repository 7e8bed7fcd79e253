"""The demo's verifiable task for critic-free RL: label the sentiment of a short review.

The prompt ``review : the lamp is very lovely =`` has exactly one right answer, ``good`` (``okay`` for
a neutral adjective, ``bad`` for a negative one), which :func:`exact_match` checks. The SFT data
teaches the format but is noisy on purpose (``NOISE`` of its labels are wrong), so the SFT model is
right only part of the time and RL with an exact-match reward has something to fix. The reviews use
the review task's words, so the task shares its vocabulary. (The adjective sits right before ``=``:
the 0.8M-parameter demo model learns that mapping in a few hundred steps, while labels that depend on
words further back took it far longer than the demo's budget.)
"""

from __future__ import annotations

import random

from . import reviews

LABELS = {+1: "good", 0: "okay", -1: "bad"}
PREFIX = ["review", ":"]
SUFFIX = ["="]
NOISE = 0.3


def sample_prompt(rng: random.Random) -> tuple[str, str]:
    """A prompt and its right answer."""
    sentiment = rng.choice([-1, 0, 1])
    very = ["very"] if rng.random() < 0.5 else []
    words = ["the", rng.choice(reviews.PRODUCTS), "is", *very, rng.choice(reviews.ADJECTIVES[sentiment])]
    return " ".join(PREFIX + words + SUFFIX), LABELS[sentiment]


def noisy_label(rng: random.Random, answer: str, noise: float = NOISE) -> str:
    """The right label, or with probability ``noise`` one of the two wrong ones."""
    if rng.random() >= noise:
        return answer
    return rng.choice([v for v in LABELS.values() if v != answer])


def sentence_of(prompt: str) -> list[str]:
    toks = prompt.split()
    if toks[: len(PREFIX)] == PREFIX:
        toks = toks[len(PREFIX):]
    if toks[-len(SUFFIX):] == SUFFIX:
        toks = toks[: -len(SUFFIX)]
    return toks


def answer_of(prompt: str) -> str | None:
    """The right label of a prompt, or None if its review is not in the grammar."""
    sentiment, _ = reviews._parse(sentence_of(prompt) + ["."])
    return None if sentiment is None else LABELS[sentiment]


def exact_match(prompt: str, completion: str) -> float:
    """1.0 if ``completion`` is exactly the right label (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == answer_of(prompt))
