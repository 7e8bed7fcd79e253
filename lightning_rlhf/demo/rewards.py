"""Reward functions of the demo tasks, in TRL's signature, for use by import path from YAML.

``fn(prompts, completions, **columns) -> list[float | None]``: ``prompts`` are raw prompts (a string
or a list of chat messages), ``completions`` the decoded responses.
"""

from __future__ import annotations

from typing import Any

from . import reverse, reviews, sentiment


def prompt_to_text(prompt: Any) -> str:
    """The user text of a prompt: a string as is, a message list's last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def gold_reward(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """The review task's gold reward (see :func:`lightning_rlhf.demo.reviews.gold_reward`)."""
    return [reviews.gold_reward(prompt_to_text(p), c) for p, c in zip(prompts, completions, strict=True)]


def reverse_exact_match(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion is the prompt's words reversed, else 0.0."""
    return [reverse.exact_match(prompt_to_text(p), c) for p, c in zip(prompts, completions, strict=True)]


def sentiment_exact_match(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion is the right sentiment label of the prompt's sentence, else 0.0."""
    return [sentiment.exact_match(prompt_to_text(p), c) for p, c in zip(prompts, completions, strict=True)]
