"""Padding-free batches: variable-length rows packed into fewer rows with a block-diagonal mask.

A batch of ``N`` rows of width ``T`` (any padding layout; ``attention_mask`` marks the real tokens)
wastes the compute of its padding. :func:`pack_rows` puts the real tokens of several rows one after
the other into one row of at most ``max_tokens`` tokens (first-fit decreasing over the rows' real
lengths, :func:`pack`), with

- the position of each token in its own row (``position_ids`` given, e.g. a shared-prompt row's
  restarted positions, or counted over the real tokens: ``cumsum(mask) - 1``);
- a ``(B', 1, L, L)`` bool "may attend" mask: a token attends only to tokens of its own row, and there
  exactly as in its row (causal over the row's columns, or the row's own ``allowed`` mask, e.g.
  ``prefix.attention_allowed``); padding queries attend to themselves only (no empty softmax row);

so that every token sees what it sees in its own row and the per-token outputs are the same (up to
float rounding). Since the mask says who sees whom, the order of the tokens in a packed row is free:
the tokens whose outputs are wanted (``keep``) go to the end of their packed row, so that a model's
``logits_to_keep=packing.keep`` runs the LM head on those columns only. :func:`unpack` scatters
per-token outputs of those columns back to the ``(N, T)`` layout; :func:`gather_packed` takes
``(N, T)`` per-token inputs (e.g. next-token labels) to the packed layout.

Pure tensor functions (torch only); the forward helpers in ``models/forward.py`` turn the bool mask
into the form the attention implementation takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

PackingStrategy = Literal["ffd", "greedy"]


def pack(lengths: Sequence[int], max_length: int, strategy: PackingStrategy = "ffd") -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens.

    ``"ffd"`` (first-fit decreasing) sorts by length and puts each example in the first row with
    room; ``"greedy"`` keeps the order and starts a new row when the next example does not fit.
    Every index appears in exactly one row; rows are returned in creation order.
    """
    if any(n > max_length for n in lengths):
        raise ValueError(f"an example is longer than max_length={max_length}; truncate before packing")
    if strategy == "greedy":
        rows: list[list[int]] = []
        used = max_length + 1
        for i, n in enumerate(lengths):
            if used + n > max_length:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    if strategy != "ffd":
        raise ValueError(f"unknown packing strategy {strategy!r}: expected 'ffd' or 'greedy'")
    # First fit: the lowest-numbered row with room. A max-tree over the rows' free space finds it in
    # O(log N) (O(N log N) in all, for the large data sets packed at setup); rows not opened yet count
    # as empty, so when no open row has room the first unopened one is the next new row.
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [max_length] * (2 * size)
    rows = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        pos = 1
        while pos < size:
            pos = 2 * pos if free[2 * pos] >= n else 2 * pos + 1
        if pos - size == len(rows):
            rows.append([])
        rows[pos - size].append(i)
        free[pos] -= n
        pos //= 2
        while pos:
            free[pos] = max(free[2 * pos], free[2 * pos + 1])
            pos //= 2
    return rows

class Packing(NamedTuple):
    """``N`` rows of width ``T`` packed into ``B'`` rows of width ``L`` (shapes below).

    Attributes:
        input_ids: ``(B', L)`` long; padding (at the start of a packed row) holds the pad value.
        position_ids: ``(B', L)`` long, each token's position in its own row; 0 on padding.
        allowed: ``(B', 1, L, L)`` bool, may query ``q`` attend to key ``k``.
        source: ``(B', L)`` long, ``i * T + t`` for the token of row ``i``, column ``t``; -1 on padding.
        keep: every kept token sits in the last ``keep`` columns of its packed row (``keep >= 1``).
        index: ``(N, T)`` long, where each kept token's output is in the flattened ``(B', keep)`` last
            columns; ``B' * keep`` (one past the end: the fill value) for every other token.
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    source: Tensor
    keep: int
    index: Tensor


def pack_rows(
    input_ids: Tensor,
    attention_mask: Tensor,
    max_tokens: int | None = None,
    *,
    position_ids: Tensor | None = None,
    allowed: Tensor | None = None,
    keep: Tensor | None = None,
    pad_value: int = 0,
) -> Packing:
    """Pack the real tokens of ``N`` rows into rows of at most ``max_tokens`` tokens.

    Args:
        input_ids: ``(N, T)`` long, any padding layout.
        attention_mask: ``(N, T)``, 1 on the real tokens (they keep their order within a row).
        max_tokens: the packed rows' capacity; None or less than the longest row: the longest row's
            real length (each packed row then costs at most one padded row's attention).
        position_ids: ``(N, T)`` each token's position; None: ``cumsum(attention_mask) - 1``.
        allowed: ``(N, 1, T, T)`` bool, the rows' own "may attend" masks (e.g. shared-prompt rows);
            None: causal over the columns.
        keep: ``(N, T)`` bool, the tokens whose outputs are wanted (placed last; see :class:`Packing`);
            None: every real token.
        pad_value: the id written into the padding.

    Rows are binned by first-fit decreasing (ties in row order), deterministic for given lengths.
    """
    n, t = input_ids.shape
    device = input_ids.device
    real = attention_mask.bool()
    if position_ids is None:
        position_ids = (real.long().cumsum(-1) - 1).clamp_(min=0)
    keep = real if keep is None else keep.bool() & real
    lengths = real.sum(-1).tolist()
    capacity = max(max(lengths, default=1), max_tokens or 1, 1)
    bins = pack(lengths, capacity)
    # per packed row: the flat source index of each token, non-kept ones first, kept ones at the end
    flat = torch.arange(n * t, device=device).view(n, t)
    order = []
    for rows in bins:
        head = [flat[i][real[i] & ~keep[i]] for i in rows]
        tail = [flat[i][keep[i]] for i in rows]
        order.append((torch.cat(head) if head else flat.new_empty(0), torch.cat(tail) if tail else flat.new_empty(0)))
    width = max((len(h) + len(k) for h, k in order), default=1) or 1
    n_keep = max((len(k) for _, k in order), default=1) or 1
    source = torch.full((len(order), width), -1, dtype=torch.long, device=device)  # (B', L)
    for b, (h, k) in enumerate(order):
        row = torch.cat([h, k])
        source[b, width - len(row) :] = row  # left padding: every row ends with its kept tokens
    pad = source < 0
    src = source.clamp(min=0)
    src_row, src_col = src // t, src % t  # (B', L)
    ids = input_ids.flatten()[src].masked_fill(pad, pad_value)
    pos = position_ids.flatten()[src].masked_fill(pad, 0)
    same = (src_row[:, :, None] == src_row[:, None, :]) & ~pad[:, :, None] & ~pad[:, None, :]  # (B', L, L)
    if allowed is None:
        visible = src_col[:, None, :] <= src_col[:, :, None]  # causal over the row's own columns
    else:
        visible = allowed[:, 0][src_row[:, :, None], src_col[:, :, None], src_col[:, None, :]].bool()
    eye = torch.eye(width, dtype=torch.bool, device=device)
    mask = (same & visible) | (pad[:, :, None] & eye)  # padding queries see themselves
    # where each kept token's output lands in the flattened (B', n_keep) last columns
    index = torch.full((n * t,), len(order) * n_keep, dtype=torch.long, device=device)
    last = source[:, width - n_keep :]  # (B', n_keep)
    slots = torch.arange(last.numel(), device=device).view_as(last)
    kept = last >= 0
    kept &= keep.flatten()[last.clamp(min=0)]
    index[last[kept]] = slots[kept]
    return Packing(ids, pos, mask[:, None], source, n_keep, index.view(n, t))


def unpack(values: Tensor, packing: Packing, fill: float = 0.0) -> Tensor:
    """Per-token outputs of the packed rows' last ``packing.keep`` columns back to the rows' layout.

    Args:
        values: ``(B', keep, *rest)`` (or ``(B', L, *rest)``: its last ``keep`` columns are used).
        packing: from :func:`pack_rows`.
        fill: the value at every token that was not kept (and at padding).

    Returns:
        ``(N, T, *rest)``: the kept tokens' outputs at their own positions; differentiable.
    """
    values = values[:, values.shape[1] - packing.keep :]
    rest = values.shape[2:]
    flat = values.reshape(-1, *rest)
    flat = torch.cat([flat, flat.new_full((1, *rest), fill)])
    return flat[packing.index.flatten()].view(*packing.index.shape, *rest)


def gather_packed(values: Tensor, packing: Packing, fill: float | int = 0) -> Tensor:
    """Per-token inputs ``(N, T, *rest)`` in the packed layout ``(B', L, *rest)`` (``fill`` on padding)."""
    rest = values.shape[2:]
    flat = values.reshape(-1, *rest)
    out = flat[packing.source.clamp(min=0)]
    pad = (packing.source < 0).view(*packing.source.shape, *([1] * len(rest)))
    return out.masked_fill(pad, fill)
