"""The embedded demo task: short product reviews with a known *gold* reward.

A prompt asks for a review of one product; a response is one to three short sentences drawn from a
tiny grammar. The gold reward (a plain Python function, :func:`gold_reward`) likes positive
sentences about the product that was asked for, and dislikes negative sentences, sentences about
another product, repeated sentences, malformed sentences and rambling past three sentences. It is
bounded in ``GOLD_RANGE``. SFT data covers the whole range of sentiment, so the SFT model's mean gold
reward sits near the middle and there is room for preference tuning and RL to show real progress;
the learned reward model is only a proxy of it, which PPO can over-optimise in visible ways
(repetition, off-topic praise).

All texts are space-separated words so that the shipped word-level tokenizer round-trips them
exactly: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PRODUCTS = ["phone", "laptop", "camera", "watch", "lamp", "chair", "bag", "kettle"]
ADJECTIVES = {
    +1: ["great", "good", "excellent", "perfect", "lovely"],
    0: ["okay", "fine", "small", "new", "black"],
    -1: ["bad", "awful", "poor", "cheap", "terrible"],
}
VERBS = {+1: ["love", "like", "recommend"], 0: ["use", "own", "bought"], -1: ["hate", "dislike", "returned"]}
PHRASES = {
    +1: ["it works well", "it feels solid", "it was worth it"],
    0: ["it arrived today", "it came in a box", "it is what it is"],
    -1: ["it broke fast", "it feels flimsy", "it was a waste"],
}
PROMPT_TEMPLATES = ["write a review of the {p} .", "review the {p} .", "what do you think of the {p} ?"]
MAX_SENTENCES = 3
GOLD_RANGE = (-1.0, 1.0)

# Every word the task can produce: the tokenizer's vocabulary is built from this.
WORDS = sorted(
    {w for t in PROMPT_TEMPLATES for w in t.format(p="").split()}
    | set(PRODUCTS)
    | {w for ws in ADJECTIVES.values() for w in ws}
    | {w for ws in VERBS.values() for w in ws}
    | {w for ps in PHRASES.values() for p in ps for w in p.split()}
    | {"the", "is", "very", "i", "this", "it", "."}
)


def prompt_text(product: str, template: int = 0) -> str:
    return PROMPT_TEMPLATES[template].format(p=product)


def product_of(prompt: str) -> str | None:
    """The product a prompt asks about (the first product word in it)."""
    for w in prompt.split():
        if w in PRODUCTS:
            return w
    return None


def _sentence(rng: random.Random, product: str, sentiment: int) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"the {product} is {rng.choice(ADJECTIVES[sentiment])} ."
    if kind == 1:
        return f"the {product} is very {rng.choice(ADJECTIVES[sentiment])} ."
    if kind == 2:
        return f"i {rng.choice(VERBS[sentiment])} this {product} ."
    return f"{rng.choice(PHRASES[sentiment])} ."


@dataclass(frozen=True)
class SentenceScore:
    text: str
    score: float
    reason: str


def score_sentences(prompt: str, response: str) -> list[SentenceScore]:
    """Parse ``response`` into sentences and score each one; see :func:`gold_reward`."""
    product = product_of(prompt)
    words = response.split()
    sentences: list[list[str]] = []
    current: list[str] = []
    for w in words:
        current.append(w)
        if w == ".":
            sentences.append(current)
            current = []
    if current:  # trailing words without a full stop: malformed
        sentences.append(current)
    out: list[SentenceScore] = []
    seen: set[str] = set()
    for i, s in enumerate(sentences):
        text = " ".join(s)
        if i >= MAX_SENTENCES:
            out.append(SentenceScore(text, -1.0, "too long"))
            continue
        if text in seen:
            out.append(SentenceScore(text, -1.0, "repeated"))
            continue
        seen.add(text)
        sentiment, subject = _parse(s)
        if sentiment is None:
            out.append(SentenceScore(text, -1.0, "malformed"))
        elif subject is not None and subject != product:
            out.append(SentenceScore(text, -0.5, "off-topic"))
        else:
            out.append(SentenceScore(text, float(sentiment), {1: "positive", 0: "neutral", -1: "negative"}[sentiment]))
    return out


def _parse(s: list[str]) -> tuple[int | None, str | None]:
    """Return (sentiment, product mentioned or None) of one sentence, or (None, None) if malformed."""
    if len(s) >= 2 and s[-1] == ".":
        body = s[:-1]
        if len(body) in (4, 5) and body[0] == "the" and body[2] == "is" and body[1] in PRODUCTS:
            if len(body) == 5 and body[3] != "very":
                return None, None
            for sentiment, adjs in ADJECTIVES.items():
                if body[-1] in adjs:
                    return sentiment, body[1]
        if len(body) == 4 and body[0] == "i" and body[2] == "this" and body[3] in PRODUCTS:
            for sentiment, verbs in VERBS.items():
                if body[1] in verbs:
                    return sentiment, body[3]
        phrase = " ".join(body)
        for sentiment, phrases in PHRASES.items():
            if phrase in phrases:
                return sentiment, None
    return None, None


def gold_reward(prompt: str, response: str) -> float:
    """The gold reward of a response, in ``GOLD_RANGE`` = [-1, 1].

    Each of the first three sentences scores +1 (positive), 0 (neutral) or -1 (negative) if it is
    about the product asked for; -0.5 if it praises or blames another product; -1 if it is
    malformed or repeats an earlier sentence. Each sentence past the third scores -1. An empty
    response scores -1. The total is divided by 3 and clipped to [-1, 1], so the best response is
    three different positive sentences about the right product.
    """
    scores = score_sentences(prompt, response)
    if not scores:
        return GOLD_RANGE[0]
    total = sum(s.score for s in scores) / MAX_SENTENCES
    return max(GOLD_RANGE[0], min(GOLD_RANGE[1], total))


def sample_response(
    rng: random.Random,
    product: str,
    *,
    repeat_prob: float = 0.08,
    off_topic_prob: float = 0.05,
    malformed_prob: float = 0.0,
    max_sentences: int = MAX_SENTENCES,
) -> str:
    """One response: 1 to ``max_sentences`` sentences of uniformly random sentiment, some repeated,
    some about another product, some malformed (a word dropped, doubled or a stray full stop)."""
    n = rng.randint(1, max_sentences)
    sentences: list[str] = []
    for _ in range(n):
        if sentences and rng.random() < repeat_prob:
            sentences.append(rng.choice(sentences))
            continue
        subject = rng.choice([p for p in PRODUCTS if p != product]) if rng.random() < off_topic_prob else product
        sentence = _sentence(rng, subject, rng.choice([-1, 0, 1]))
        if rng.random() < malformed_prob:
            sentence = _malform(rng, sentence)
        sentences.append(sentence)
    return " ".join(sentences)


def _malform(rng: random.Random, sentence: str) -> str:
    words = sentence.split()
    i = rng.randrange(len(words) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        del words[i]
    elif kind == 1:
        words.insert(i, words[i])
    else:
        words.append(".")
    return " ".join(words)


def sample_prompt(rng: random.Random) -> str:
    return prompt_text(rng.choice(PRODUCTS), rng.randrange(len(PROMPT_TEMPLATES)))
