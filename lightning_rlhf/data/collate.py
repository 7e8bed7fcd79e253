"""Collators: token examples -> right-padded ``(B, T)`` batches, plus packing and ``model_inputs``.

Packing and attention isolation
-------------------------------
A packed row holds several SFT examples one after the other; ``position_ids`` restart at 0 for each
example (and for the padding tail). The model must not let one example attend to another. With
transformers 5 this needs no ``(B, 1, T, T)`` mask from us: ``masking_utils.create_causal_mask``
detects packed rows from ``position_ids`` (a position that is not the previous one + 1 starts a new
sequence) and builds a block-diagonal causal mask for sdpa / eager / flex attention (flash-attention
uses the same ``position_ids`` for its varlen kernel) -- but only when ``attention_mask is None`` and
no cache is passed. HF causal LMs create a ``DynamicCache`` when ``use_cache`` is true (the config's
default), which silently turns the detection off, so :func:`model_inputs` always passes
``use_cache=False`` (a training forward never needs the cache anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_rlhf.core.packing import PackingStrategy, pack  # noqa: F401  (public here too)


def pad(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints into a ``(B, T)`` long tensor (``T`` = longest, or ``length``)."""
    t = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), t), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class SFTCollator:
    """SFT batch: ``input_ids``, ``attention_mask``, ``position_ids``, ``loss_mask`` (all ``(B, T)``), ``packed``.

    Each item is one example (``{"input_ids", "loss_mask"}``) or a packed row (a list of examples,
    see :func:`pack`). In a packed row ``position_ids`` restart per example and ``loss_mask`` is 0
    on each example's first token; ``packed`` is True when any row holds several examples, and then
    :func:`model_inputs` leaves out ``attention_mask`` so the model isolates the examples.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict | Sequence[dict]]) -> dict[str, Any]:
        ids, masks, positions, n_examples = [], [], [], []
        for item in items:
            row = [item] if isinstance(item, dict) else list(item)
            ids.append([t for ex in row for t in ex["input_ids"]])
            masks.append([m if j else 0 for ex in row for j, m in enumerate(ex["loss_mask"])])
            positions.append([j for ex in row for j in range(len(ex["input_ids"]))])
            n_examples.append(len(row))
        lengths = [len(s) for s in ids]
        t = max(lengths)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        # Padding positions restart at 0, so a padding tail is its own "sequence" to the packing detection.
        positions = [p + list(range(t - len(p))) for p in positions]
        return {
            "input_ids": pad(ids, self.pad_token_id, t),
            "attention_mask": pad([[1] * n for n in lengths], 0, t),
            "position_ids": pad(positions, 0, t),
            "loss_mask": pad(masks, 0, t),
            "packed": max(n_examples) > 1,
        }


class PreferenceCollator:
    """Preference batch: rows ``[:B]`` prompt+chosen, rows ``[B:]`` prompt+rejected.

    Keys: ``input_ids``, ``attention_mask``, ``position_ids``, ``loss_mask`` (completion tokens),
    all ``(2B, T)``; ``margin (B,)`` float; ``index (B,)`` long.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        seqs, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for ex in items:
                seqs.append(ex["prompt_ids"] + ex[side])
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[side]))
        lengths = [len(s) for s in seqs]
        t = max(lengths)
        return {
            "input_ids": pad(seqs, self.pad_token_id, t),
            "attention_mask": pad([[1] * n for n in lengths], 0, t),
            "position_ids": torch.arange(t).expand(len(seqs), t).clone(),
            "loss_mask": pad(masks, 0, t),
            "margin": torch.tensor([float(ex["margin"]) for ex in items], dtype=torch.float),
            "index": torch.tensor([ex["index"] for ex in items], dtype=torch.long),
        }


class PromptCollator:
    """Prompt batch: ``input_ids (B, P)``, ``attention_mask (B, P)`` right-padded; ``prompt``,
    ``prompt_text``, ``extra`` (lists); ``index (B,)``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        lengths = [len(ex["prompt_ids"]) for ex in items]
        t = max(lengths)
        return {
            "input_ids": pad([ex["prompt_ids"] for ex in items], self.pad_token_id, t),
            "attention_mask": pad([[1] * n for n in lengths], 0, t),
            "prompt": [ex["prompt"] for ex in items],
            "prompt_text": [ex["prompt_text"] for ex in items],
            "extra": [ex["extra"] for ex in items],
            "index": torch.tensor([ex["index"] for ex in items], dtype=torch.long),
        }


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for a Hugging Face model's forward on an SFT or preference batch.

    ``input_ids``, ``attention_mask`` (``None`` for a packed batch: the model then builds a
    block-diagonal causal mask from ``position_ids``), ``position_ids`` and ``use_cache=False``
    (a cache would switch the packed-sequence detection off). Use as ``model(**model_inputs(batch))``.
    """
    packed = bool(batch.get("packed", False))
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": None if packed else batch["attention_mask"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
