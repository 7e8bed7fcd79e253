"""Forward passes that turn a causal LM into per-token log-probs.

One function, `sequence_logprobs`, used by every stage that needs the log-prob of given tokens: the
PPO/GRPO training forward (`Rollout.response_logprobs`), the reference model, DPO's chosen/rejected
log-probs and evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from lightning_rlhf.core.ops import entropy_from_logits, logprobs_from_logits
from lightning_rlhf.core.packing import Packing, gather_packed, pack_rows, unpack
from lightning_rlhf.core.prefix import PromptGroups, additive_mask, attention_allowed


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: `(B, T)` mask -> `(B, T)` long.

    `attention_mask.cumsum(-1) - 1` clamped at 0, so a left-padded row starts at position 0 on its
    first real token (HF's default `arange` would start it at the number of pads).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    logits_to_keep: int = 0,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each next token under `softmax(logits / temperature)`.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one) whose forward returns `.logits`.
        input_ids: `(B, T)` long; any padding layout, real tokens marked by `attention_mask`.
        attention_mask: `(B, T)`, 1 for real tokens.
        position_ids: `(B, T)`; when None, `attention_mask.cumsum(-1) - 1` clamped at 0 (right for
            left- and right-padded rows; packed rows must pass their own).
        temperature: logits are divided by it before the softmax (the sampling temperature of the
            rollout, so that the recorded log-probs are reproduced).
        return_entropy: also return the entropy of that distribution at each position.
        logits_to_keep: when > 0, only the last `logits_to_keep` labels are scored (the model's
            `logits_to_keep` argument skips the LM head on the prefix); outputs are then
            `(B, logits_to_keep)`. Use it for responses after long prompts.
        padding_free: run the forward on packed rows (:func:`packed_forward`): the same log-probs
            wherever the label is a real token that directly follows a real one (0 elsewhere), without
            the padding's compute. Falls back to the padded rows when the model cannot take the mask.

    Returns:
        logprobs: `(B, T-1)` fp32, `logprobs[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1])`
            (or `(B, logits_to_keep)`, the last columns of that). Values at padded positions are
            meaningless; mask them with `attention_mask[:, 1:]`.
        entropy: `(B, T-1)` fp32 (same columns), or None unless `return_entropy`.

    The model's logits are the only vocab-sized tensor: `logprobs_from_logits` /
    `entropy_from_logits` apply the temperature and the fp32 upcast chunk by chunk.
    """
    logprobs, entropy, _ = _logprobs_and_align(
        model, input_ids, attention_mask, position_ids, temperature, return_entropy, logits_to_keep, padding_free
    )
    return logprobs, entropy


def _logprobs_and_align(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    temperature: float,
    return_entropy: bool,
    logits_to_keep: int,
    padding_free: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """`sequence_logprobs`, plus `align`: a function that takes any per-position tensor aligned with
    the model's logits `(B | B', K, ...)` (e.g. the LM head's input, caught by a hook) to the
    log-probs' layout `(B, T-1 | logits_to_keep, ...)`."""
    if temperature <= 0:
        raise ValueError(f"sequence_logprobs: temperature must be > 0, got {temperature}")
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    labels = input_ids[:, 1:]  # (B, T-1)
    if logits_to_keep > labels.shape[1]:
        raise ValueError(f"logits_to_keep={logits_to_keep} exceeds the {labels.shape[1]} labels of the batch")
    packed = None
    if padding_free:
        real = attention_mask.bool()
        keep = torch.zeros_like(real)
        keep[:, :-1] = real[:, :-1] & real[:, 1:]  # the label is the next real token
        if logits_to_keep > 0:
            keep[:, : keep.shape[1] - 1 - logits_to_keep] = False
        packed = packed_forward(model, input_ids, attention_mask, position_ids, keep=keep)
    if packed is not None:
        packing, kwargs = packed
        logits = model(**kwargs, logits_to_keep=packing.keep).logits  # (B', K, V): the kept tokens' columns
        next_ids = torch.cat([labels, labels[:, :1]], dim=1)  # (B, T): the label of each column (last: unused)
        packed_labels = gather_packed(next_ids, packing)[:, -packing.keep :]  # (B', K)

        def align(x: torch.Tensor) -> torch.Tensor:  # (B', K, ...) -> (B, T-1 | k, ...)
            rows = unpack(x, packing)[:, :-1]
            return rows[:, -logits_to_keep:] if logits_to_keep > 0 else rows

        logprobs = align(logprobs_from_logits(logits, packed_labels, temperature=temperature))
        entropy = align(entropy_from_logits(logits, temperature=temperature)) if return_entropy else None
        return logprobs, entropy, align
    kwargs = {}
    if logits_to_keep > 0:
        # the last k labels need the logits of positions T-1-k .. T-2, i.e. the last k+1 minus the final one
        kwargs["logits_to_keep"] = logits_to_keep + 1
        labels = labels[:, -logits_to_keep:]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    ).logits[:, :-1]  # (B, T-1 | k, V) view; the last position predicts nothing we have
    # temperature is applied chunk by chunk inside core's ops: no scaled copy of the logits
    logprobs = logprobs_from_logits(logits, labels, temperature=temperature)
    entropy = entropy_from_logits(logits, temperature=temperature) if return_entropy else None

    def align(x: torch.Tensor) -> torch.Tensor:  # (B, T | k+1, ...) -> (B, T-1 | k, ...)
        return x[:, :-1]

    return logprobs, entropy, align


def four_d_mask_refusal(model: torch.nn.Module) -> str | None:
    """Why `model` cannot take an arbitrary 4D attention mask (prompt sharing, packed rows), or None.

    Only the attention implementation is checked here; a sliding window is checked per forward
    (it depends on the row length)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if impl in ("sdpa", "eager"):
        return None
    return (
        f"{type(hf).__name__} uses attn_implementation={impl!r}, which cannot take an arbitrary 4D attention "
        "mask; load it with attn_implementation 'sdpa' or 'eager'"
    )


def packed_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> tuple[Packing, dict] | None:
    """The rows' real tokens packed (``core.packing.pack_rows``) and the keyword arguments of the
    model's forward on them, or None: the caller then runs the padded rows. None when packing saves
    no row (every row alone in its packed row, e.g. no row stopped early: the padded rows cost the
    same and sdpa may take its plain causal path), and, with a warning, when the model cannot take
    the packed rows' 4D mask (see :func:`shared_prompt_mask`).

    Args: as :func:`~lightning_rlhf.core.packing.pack_rows` (``position_ids`` None: counted over
    the real tokens, as the padded forward). Returns ``(packing, kwargs)``, ``kwargs`` holding
    ``input_ids``, the mask, ``position_ids`` and ``use_cache=False``.
    """
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    packing = pack_rows(input_ids, attention_mask, max_tokens, position_ids=position_ids, allowed=allowed, keep=keep)
    if packing.input_ids.shape[0] >= int(attention_mask.bool().any(-1).sum()):
        return None  # every row alone in its packed row: nothing saved, the padded rows are as cheap
    mask = shared_prompt_mask(model, packing.allowed)
    if mask is None:
        reason = four_d_mask_refusal(model) or "its sliding window is shorter than the packed rows"
        warnings.warn(f"padding_free: running padded rows instead: {reason}", stacklevel=3)
        return None
    kwargs = {"input_ids": packing.input_ids, "attention_mask": mask, "position_ids": packing.position_ids}
    return packing, {**kwargs, "use_cache": False}


def shared_prompt_mask(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor | None:
    """A `(B, 1, T, T)` bool "may attend" mask in the form `model`'s attention takes, or None
    (shared-prompt rows of `core.prefix`, packed rows of `core.packing`).

    transformers 5 passes a 4D `attention_mask` through unchanged (`masking_utils` returns it as
    is): sdpa takes it as bool (True = attend), eager adds it to the scores, so it gets an additive
    float mask in the model's dtype. Other implementations (flash-attention, flex) cannot take an
    arbitrary mask: None, and the caller scores separate sequences instead; None too when the
    config's sliding window is shorter than the row (one mask for every layer would drop it).
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    window = getattr(config.get_text_config(), "sliding_window", None) if config is not None else None
    if window is not None and allowed.shape[-1] > window:
        return None
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(hf.parameters()).dtype
        return additive_mask(allowed, dtype if dtype.is_floating_point else torch.float32)
    return None


def grouped_response_logprobs(
    model: torch.nn.Module,
    shared: PromptGroups,
    response_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Response log-probs (and entropies) of a rollout micro-batch from its shared-prompt rows
    (``core.prefix.share_prompt_groups``: one row ``[prompt, r_1, ..., r_G]`` per prompt group), with
    one forward; None when the model cannot take the rows' 4D mask (:func:`shared_prompt_mask`): the
    caller then scores the rows apart.

    Args:
        shared: the groups' rows; ``response_ids``: ``(N, R)`` the rollout's responses (the labels).
        temperature, return_entropy: as :func:`sequence_logprobs`.
        padding_free: pack the shared rows' real tokens (``core.packing``, each row's own mask and
            positions) when that saves rows.

    Returns:
        ``(N, R)`` fp32 log-probs and entropies (or None), the same as the separate rows' wherever
        ``response_mask`` is 1 (meaningless elsewhere; the caller masks them).

    The LM head runs on the columns from the branch (``P - 1``) on. Each response token ``k >= 1``
    is the shared row's own next token at ``shared.column``; the first one (``k = 0``) is read at the
    branch with each row's own label (G labels from one column, as DPO's branch column).
    """
    if temperature <= 0:
        raise ValueError(f"grouped_response_logprobs: temperature must be > 0, got {temperature}")
    ids = shared.input_ids
    b, width = ids.shape
    first = shared.prompt_width - 1  # the branch column: every column from it on is scored
    allowed = attention_allowed(shared.segment)  # (B', 1, L, L)
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (B', L): the label of each column (last: unused)
    packed = None
    if padding_free:
        keep = shared.attention_mask.bool().clone()
        keep[:, :first] = False
        packed = packed_forward(
            model, ids, shared.attention_mask, shared.position_ids, keep=keep, allowed=allowed
        )
    if packed is not None:
        packing, kwargs = packed
        logits = model(**kwargs, logits_to_keep=packing.keep).logits  # (B'', K, V)
        labels = gather_packed(next_ids, packing)[:, -packing.keep :]  # (B'', K)
        slot = packing.index  # (B', L) -> flat (B'' * K) slot
    else:
        mask = shared_prompt_mask(model, allowed)
        if mask is None:
            return None
        keep = width - first
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=shared.position_ids, use_cache=False, logits_to_keep=keep
        ).logits  # (B', K, V): columns first .. L-1
        labels = next_ids[:, first:]
        slot = torch.arange(b * keep, device=ids.device).view(b, keep)
        slot = torch.cat([slot.new_zeros(b, first), slot], dim=1)  # (B', L); prompt columns: never read
    flat = logits.reshape(-1, logits.shape[-1])  # (M, V)
    idx = slot[shared.group[:, None], shared.column]  # (N, R) rows of `flat`
    row_lp = logprobs_from_logits(flat, labels.reshape(-1), temperature=temperature)  # (M,)
    branch = logprobs_from_logits(flat[idx[:, 0]], response_ids[:, 0], temperature=temperature)  # (N,)
    logprobs = torch.cat([branch[:, None], row_lp[idx[:, 1:]]], dim=1)  # (N, R)
    entropy = entropy_from_logits(flat, temperature=temperature)[idx] if return_entropy else None
    return logprobs, entropy
