"""Prompt sharing for preference pairs: one row ``[prompt, chosen, rejected]`` per pair.

A preference batch holds each prompt twice (rows ``[:B]`` prompt + chosen, rows ``[B:]`` prompt +
rejected: ``2(P + R)`` tokens per pair). Chosen and rejected share the prompt, so one row per pair
holds the prompt once, then the chosen completion, then the rejected one (``P + C + R`` tokens).
The rejected tokens take positions ``P, P+1, ...`` (as in their own sequence) and attend to the
prompt and, causally, to each other but never to the chosen tokens; so every token sees exactly
what it sees in its separate sequence and the per-sequence results are the same (up to float
rounding: the same sums in another order).

Reading results off a shared row:

- the next-token log-prob at column ``t`` is ``log p(ids[t + 1] | row up to t)``; for the chosen
  tokens (labels at ``P .. P+C-1``) that is their own log-prob, and for the rejected tokens after the
  first (labels at ``P+C+1 .. P+C+R-1``) too; the first rejected token is predicted by the last
  prompt token (column ``P-1``, the *branch*), whose row label is the first chosen token, so its
  log-prob is read separately: label ``ids[P+C]`` at column ``P-1``;
- a sequence score (reward model) is read at ``P+C-1`` (chosen) and ``P+C+R-1`` (rejected).

Pure tensor functions (torch only): the stages build the row, pass :func:`attention_allowed` (as a
bool or additive 4D mask, depending on the attention implementation) and ``position_ids`` to the model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


class SharedPrompt(NamedTuple):
    """One ``[prompt, chosen, rejected]`` row per pair, right-padded to ``T'`` (shapes for ``B`` pairs).

    Attributes:
        input_ids: ``(B, T')`` long; padding takes the pad value given to :func:`share_prompt`.
        position_ids: ``(B, T')`` long; the rejected part restarts at the prompt length; 0 on padding.
        segment: ``(B, T')`` long: ``PROMPT`` 0, ``CHOSEN`` 1, ``REJECTED`` 2, ``PAD`` 3.
        prompt_len, chosen_len, rejected_len: ``(B,)`` long token counts (completions incl. EOS).
    """

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    prompt_len: Tensor
    chosen_len: Tensor
    rejected_len: Tensor


def share_prompt(
    input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, pad_value: int = 0
) -> SharedPrompt | None:
    """Shared rows from a right-padded preference batch of ``2B`` rows; None when a pair has no prompt
    (nothing to share, and no token to predict its completions' first tokens from: score rows apart).

    Args:
        input_ids: ``(2B, T)``; rows ``[:B]`` prompt + chosen, rows ``[B:]`` prompt + rejected of the
            same pairs, right-padded.
        attention_mask: ``(2B, T)``, 1 on real tokens.
        loss_mask: ``(2B, T)``, 1 on the completion tokens: every real token from the first 1 on
            (the prompt is everything before it and must be the same in both rows of a pair).
        pad_value: the id written into the padding.

    Raises:
        ValueError: an odd number of rows, a completion mask that is not the tail of the real tokens,
            an empty completion, or a pair whose two rows have different prompts.
    """
    n, t = input_ids.shape
    if n % 2:
        raise ValueError(f"share_prompt: a preference batch has an even number of rows, got {n}")
    b = n // 2
    real = attention_mask.long().sum(-1)  # (2B,)
    completion = loss_mask.long().sum(-1)  # (2B,)
    prompt = real - completion  # (2B,)
    col = torch.arange(t, device=input_ids.device)
    expected = (col >= prompt[:, None]) & (col < real[:, None])
    if not torch.equal(loss_mask.bool() & attention_mask.bool(), expected) or not torch.equal(
        attention_mask.bool(), col < real[:, None]
    ):
        raise ValueError("share_prompt: rows must be right-padded with the completion mask covering their real tail")
    p = prompt[:b]
    if bool((p != prompt[b:]).any()) or bool((completion < 1).any()):
        raise ValueError("share_prompt: every pair needs the same prompt and non-empty completions")
    if bool((p < 1).any()):
        return None
    differ = (input_ids[:b] != input_ids[b:]) & (col < p[:, None])  # (B, T)
    if bool(differ.any()):
        raise ValueError(f"share_prompt: pairs {differ.any(-1).nonzero().flatten().tolist()[:10]} have different prompts")
    c, r = completion[:b], completion[b:]
    length = p + c + r  # (B,)
    width = int(length.max())
    j = torch.arange(width, device=input_ids.device).expand(b, width)  # (B, T')
    in_first = j < (p + c)[:, None]  # prompt or chosen: read from the chosen row at the same column
    is_real = j < length[:, None]
    src_col = torch.where(in_first, j, j - c[:, None]).clamp(0, t - 1)
    ids = torch.where(in_first, input_ids[:b].gather(1, src_col), input_ids[b:].gather(1, src_col))
    ids = torch.where(is_real, ids, torch.full_like(ids, pad_value))
    segment = torch.where(
        j < p[:, None],
        PROMPT,
        torch.where(in_first, CHOSEN, torch.where(is_real, REJECTED, PAD)),
    )
    return SharedPrompt(
        input_ids=ids,
        position_ids=torch.where(is_real, src_col, 0),
        segment=segment,
        prompt_len=p,
        chosen_len=c,
        rejected_len=r,
    )


def attention_allowed(segment: Tensor) -> Tensor:
    """``(B, 1, T', T')`` bool: may query ``q`` attend to key ``k`` (True) in a shared row.

    Causal (``k <= q``), and a key is visible when it is in the prompt or in the query's own segment:
    the rejected tokens never see the chosen ones. Padding queries see the prompt and the padding
    before them (never an empty row, so no NaN in the softmax).
    """
    t = segment.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()  # (T', T') [q, k]
    q, k = segment[:, :, None], segment[:, None, :]  # (B, T', 1), (B, 1, T')
    return (causal & ((k == PROMPT) | (k == q)))[:, None]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as an additive float mask: 0 where allowed, the dtype's lowest value elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def completion_columns(shared: SharedPrompt) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where the completion log-probs of a shared row are, in next-token columns ``t = 0 .. T'-2``.

    Returns:
        chosen_mask: ``(B, T'-1)`` bool, the columns whose row label is a chosen token.
        rejected_mask: ``(B, T'-1)`` bool, the columns whose row label is a rejected token other than
            the first (its log-prob is read at the branch).
        branch_col: ``(B,)`` long, ``P - 1``: the last prompt token, which predicts both first tokens.
        branch_label: ``(B,)`` long, the first rejected token ``ids[P + C]``.
    """
    b, width = shared.input_ids.shape
    t = torch.arange(width - 1, device=shared.input_ids.device)[None]  # (1, T'-1): label at t + 1
    p, c, r = shared.prompt_len[:, None], shared.chosen_len[:, None], shared.rejected_len[:, None]
    chosen = (t >= p - 1) & (t < p + c - 1)
    rejected = (t >= p + c) & (t < p + c + r - 1)
    branch_col = shared.prompt_len - 1
    branch_label = shared.input_ids.gather(1, (shared.prompt_len + shared.chosen_len)[:, None])[:, 0]
    return chosen, rejected, branch_col, branch_label


def last_positions(shared: SharedPrompt) -> tuple[Tensor, Tensor]:
    """``(B,)`` each: the positions of the last chosen and the last rejected token (sequence scores)."""
    end_chosen = shared.prompt_len + shared.chosen_len - 1
    return end_chosen, end_chosen + shared.rejected_len


# ------------------------------------------------------------------------------ prompt groups (GRPO/RLOO)


class PromptGroups(NamedTuple):
    """One row ``[prompt, r_1, ..., r_G]`` per group of rollout rows with the same prompt (``B'`` groups,
    ``N`` rollout rows of ``R`` response columns).

    The prompt is left-padded to the rollout's ``P`` columns (so every group's last prompt token, the
    *branch* that predicts each response's first token, is column ``P - 1``); the responses follow one
    after the other, each at positions ``p, p+1, ...`` (``p`` the group's real prompt length), each
    attending to the prompt and, causally, to itself (:func:`attention_allowed` over ``segment``).

    Attributes:
        input_ids: ``(B', L)`` long; padding holds the pad value.
        attention_mask: ``(B', L)`` long, 1 on real tokens.
        position_ids: ``(B', L)`` long; 0 on padding.
        segment: ``(B', L)`` long: ``PROMPT`` (0) on the prompt, ``j + 1`` on the group's response ``j``,
            -1 on padding (left padding of the prompt, right padding of the row).
        group: ``(N,)`` long, the shared row of each rollout row.
        column: ``(N, R)`` long, the shared row's column whose logits predict response token ``k``
            of row ``i``: ``P - 1`` for ``k = 0`` (the branch), the previous response token's
            column after it (``P - 1`` too on response padding: read, then masked by the caller).
        prompt_width: ``P``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    segment: Tensor
    group: Tensor
    column: Tensor
    prompt_width: int


def group_rows(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]] | None:
    """Rollout rows grouped by identical prompt content (real tokens), in first-appearance order,
    each group's rows in row order; None when no two rows share a prompt or some prompt is empty
    (no branch token to predict its responses' first tokens from)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    real = prompt_mask.bool()
    if not bool(real.any(-1).all()):
        return None
    for i, (ids, m) in enumerate(zip(prompt_ids.tolist(), real.tolist(), strict=True)):
        groups.setdefault(tuple(t for t, keep in zip(ids, m, strict=True) if keep), []).append(i)
    rows = list(groups.values())
    return rows if len(rows) < prompt_ids.shape[0] else None


def share_prompt_groups(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    pad_value: int = 0,
    groups: list[list[int]] | None = None,
) -> PromptGroups | None:
    """The shared rows of a rollout micro-batch (:class:`PromptGroups`), or None when no two rows share
    a prompt (score the rows apart).

    Args:
        prompt_ids: ``(N, P)`` left-padded prompts; ``prompt_mask`` ``(N, P)``, 1 on real tokens.
        response_ids: ``(N, R)`` right-padded responses; ``response_mask`` ``(N, R)``, 1 on real tokens
            (a prefix of each row).
        pad_value: the id written into the padding.
        groups: the rows of each group (as :func:`group_rows`, which finds them by content when None).

    Rows may come in any order (groups are found by content). Reading results back: the per-column
    outputs of the shared rows (logits, entropies) at ``[group[:, None], column]`` are the rollout's
    ``(N, R)`` outputs; log-probs need response token ``k`` as the label there (for ``k >= 1`` that
    is the shared row's own next token, for ``k = 0`` a different label per row at the branch).
    """
    if groups is None:
        groups = group_rows(prompt_ids, prompt_mask)
        if groups is None:
            return None
    device = prompt_ids.device
    n, p = prompt_ids.shape
    r = response_ids.shape[1]
    lengths = response_mask.long().sum(-1)  # (N,)
    if not torch.equal(response_mask.bool(), torch.arange(r, device=device) < lengths[:, None]):
        raise ValueError("share_prompt_groups: responses must be right-padded (mask a prefix of each row)")
    b = len(groups)
    group = torch.empty(n, dtype=torch.long, device=device)
    start = torch.empty(n, dtype=torch.long, device=device)  # first response column of each row
    slot = torch.empty(n, dtype=torch.long, device=device)  # the row's response index in its group
    width = p
    lens = lengths.tolist()
    for g, rows in enumerate(groups):
        col = p
        for j, i in enumerate(rows):
            group[i], start[i], slot[i] = g, col, j
            col += lens[i]
        width = max(width, col)
    first = torch.tensor([rows[0] for rows in groups], device=device)  # (B',) a row of each group
    ids = torch.full((b, width), pad_value, dtype=torch.long, device=device)
    segment = torch.full((b, width), -1, dtype=torch.long, device=device)
    positions = torch.zeros((b, width), dtype=torch.long, device=device)
    pmask = prompt_mask.bool()[first]  # (B', P)
    ids[:, :p] = torch.where(pmask, prompt_ids[first], pad_value)
    segment[:, :p] = torch.where(pmask, PROMPT, -1)
    positions[:, :p] = (pmask.long().cumsum(-1) - 1).clamp(min=0) * pmask
    plen = pmask.long().sum(-1)  # (B',)
    k = torch.arange(r, device=device)[None]  # (1, R)
    real = k < lengths[:, None]  # (N, R)
    dest = (start[:, None] + k).clamp(max=width - 1)  # (N, R)
    rows_g = group[:, None].expand(n, r)
    ids[rows_g[real], dest[real]] = response_ids[real]
    segment[rows_g[real], dest[real]] = (slot[:, None] + 1).expand(n, r)[real]
    positions[rows_g[real], dest[real]] = (plen[group][:, None] + k).expand(n, r)[real]
    column = torch.where((k >= 1) & real, dest - 1, p - 1)
    return PromptGroups(
        input_ids=ids,
        attention_mask=(segment >= 0).long(),
        position_ids=positions,
        segment=segment,
        group=group,
        column=column,
        prompt_width=p,
    )
