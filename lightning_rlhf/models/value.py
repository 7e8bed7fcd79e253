"""The critic of PPO: a transformer backbone plus a scalar value head, read at every position.

Two layouts, one output convention:

- **Separate critic** (default): a one-label ``AutoModelForSequenceClassification``, i.e. a
  backbone plus a linear ``score`` head. Loaded from the reward model's folder (InstructGPT's
  choice: the critic starts out knowing what is rewarded) or from the policy's (a fresh head).
  :func:`sequence_values` reads the head's per-token output with a forward hook, so the whole model
  runs (peft / FSDP wrappers keep their hooks).
- **Shared backbone**: a :class:`ValueHead` on the policy's own last hidden state, for small memory
  budgets. :func:`logprobs_and_values` runs the policy once and returns log-probs and values.

Values follow the log-prob alignment of :func:`~lightning_rlhf.models.forward.sequence_logprobs`:
column ``t`` of the ``(B, T-1)`` output is ``V(s_t)``, the value of the prefix ``input_ids[:, :t+1]``,
i.e. of the state in which token ``t+1`` is chosen. So the value of response token ``j`` sits in the
same column as its log-prob.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_rlhf.core.packing import unpack
from lightning_rlhf.models.forward import _logprobs_and_align, default_position_ids, packed_forward


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_size(model: nn.Module) -> int:
    return hf_model(model).config.get_text_config().hidden_size


class ValueHead(nn.Module):
    """Scalar value head ``(..., H) -> (...)`` on a backbone's last hidden state.

    Zero-initialised: the critic starts at V = 0 everywhere, so the first advantages are the
    (whitened) returns themselves rather than returns minus noise from a random head.
    """

    def __init__(self, hidden: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.summary = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def _score_head(model: nn.Module) -> nn.Module:
    hf = hf_model(model)
    for attr in ("score", "classifier"):  # the head's name differs across families (as in rollout.scoring)
        head = getattr(hf, attr, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(
        f"sequence_values: {type(hf).__name__} has no `score` (or `classifier`) head; the critic must be a "
        "one-label AutoModelForSequenceClassification of a decoder model"
    )


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[list]:
    """Collect what ``module`` returns during the block (a forward hook, removed after)."""
    captured: list = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def _capture_input(module: nn.Module) -> Iterator[list]:
    """Collect the first positional input of ``module`` during the block (a forward pre-hook)."""
    captured: list = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def sequence_values(
    critic: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    values_to_keep: int = 0,
    padding_free: bool = False,
) -> torch.Tensor:
    """Per-position values of a one-label sequence classifier (the separate critic).

    Args:
        critic: ``AutoModelForSequenceClassification`` with one label (or a peft wrapper of one).
        input_ids: ``(B, T)`` long, any padding layout.
        attention_mask: ``(B, T)``, 1 for real tokens.
        position_ids: ``(B, T)``; default ``attention_mask.cumsum(-1) - 1`` (as the rollout).
        values_to_keep: when > 0, only the last ``values_to_keep`` columns are returned (the
            response of a rollout).
        padding_free: run the critic on packed rows (``models.forward.packed_forward``): the same
            values at every real token (0 on padding); falls back to the padded rows when the model
            cannot take the mask.

    Returns:
        ``(B, T-1)`` fp32 (or ``(B, values_to_keep)``): column ``t`` is the value of the prefix
        ending at token ``t``, aligned with ``sequence_logprobs``' column for token ``t+1``. Keeps
        gradients unless called under ``torch.no_grad()``.
    """
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    packed = None
    if padding_free:
        keep = attention_mask.bool().clone()
        if values_to_keep > 0:
            keep[:, : keep.shape[1] - 1 - values_to_keep] = False
        packed = packed_forward(critic, input_ids, attention_mask, position_ids, keep=keep)
    with _capture_output(_score_head(critic)) as captured:
        if packed is None:
            critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        else:
            critic(**packed[1])
    per_token = captured[-1]  # (B, T, 1), or (B', L, 1) packed
    if per_token.shape[-1] != 1:
        raise ValueError(f"sequence_values: the critic has {per_token.shape[-1]} labels, expected 1")
    if packed is not None:
        per_token = unpack(per_token, packed[0])  # (B, T, 1), 0 on padding
    values = per_token[:, :-1, 0].float()  # (B, T-1)
    return values[:, -values_to_keep:] if values_to_keep > 0 else values


def logprobs_and_values(
    policy: nn.Module,
    value_head: ValueHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    logits_to_keep: int = 0,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward of a causal LM giving log-probs (as ``sequence_logprobs``) and the values of a
    :class:`ValueHead` on its backbone's last hidden state (the shared-backbone critic).

    ``padding_free``: packed rows, as ``sequence_logprobs`` (values 0 where log-probs are).

    Returns:
        ``(logprobs, entropy | None, values)``, each ``(B, T-1)`` fp32 (or the last
        ``logits_to_keep`` columns), aligned column by column.
    """
    # The LM head's input is the final hidden state (after the final norm, and e.g. OPT's project_out),
    # whatever the family: hooking the backbone module instead misses models whose forward calls an
    # inner module directly (OPTForCausalLM runs ``model.decoder``, not ``model``).
    lm_head = hf_model(policy).get_output_embeddings()
    with _capture_input(lm_head) as captured:
        logprobs, entropy, align = _logprobs_and_align(
            policy, input_ids, attention_mask, position_ids, temperature, return_entropy, logits_to_keep, padding_free
        )
    # the LM head's input, aligned as the log-probs: (B, T-1 | k): position t predicts token t+1
    return logprobs, entropy, align(value_head(captured[-1]))
