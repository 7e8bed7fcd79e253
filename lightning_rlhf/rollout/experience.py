"""``Experience``: one rollout step's training data, from the rollout to the loss.

The online stages build it after scoring and the no-grad forwards, hand it to the mini-batch loop
(``OnlineRLModule.optimise_minibatches``), and each micro-batch's loss reads its fields by name::

    exp = Experience(rollout, old_logprobs=..., ref_logprobs=..., values=..., rewards=..., kl=...)
    exp.advantages, exp.returns = gae(exp.rewards, exp.values, exp.response_mask, gamma, lam)
    ...
    mb = exp.select(idx)          # rows idx, trimmed to the columns they use
    loss, stats = loss_fn(mb)     # e.g. ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, ...)

Only the data, no optimisation: it lives with the rollout (``rollout/`` knows nothing about
optimisers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch

from lightning_rlhf.rollout.generate import Rollout

_ALIGNED = ("old_logprobs", "ref_logprobs", "values", "rewards", "kl", "advantages", "returns")


@dataclass
class Experience:
    """A rollout and, row for row, what the stage computed from it. Every field but ``rollout`` may
    be None (a stage fills what its algorithm needs).

    ``(N, R)`` fields are aligned with the rollout's responses (column ``t`` = response token ``t``,
    0 off ``response_mask``); ``(N,)`` fields hold one number per row (sequence level).
    """

    rollout: Rollout  # N rows: prompt/response ids and masks, the sampler's log-probs
    old_logprobs: torch.Tensor | None = None  # (N, R) fp32 under the rollout policy (the ratio's denominator)
    ref_logprobs: torch.Tensor | None = None  # (N, R) fp32 under the frozen reference (KL)
    values: torch.Tensor | None = None  # (N, R) critic values at the rollout (PPO)
    rewards: torch.Tensor | None = None  # (N, R) per-token (PPO: KL-shaped) or (N,) sequence rewards
    kl: torch.Tensor | None = None  # (N, R) per-token KL to the reference
    advantages: torch.Tensor | None = None  # (N, R) per token (GAE) or (N,) per sequence (group estimators)
    returns: torch.Tensor | None = None  # (N, R) value targets (PPO)

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def response_mask(self) -> torch.Tensor:
        """``(N, R)`` the rollout's response mask."""
        return self.rollout.response_mask

    def aligned(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the fields that are set, besides the rollout."""
        for name in _ALIGNED:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def select(self, idx: torch.Tensor) -> Experience:
        """Rows ``idx`` (a long tensor), trimmed to the columns those rows use: all-pad prompt columns
        on the left, response columns after the longest response; so a mini-batch of short responses
        runs a short forward. ``(N, R)`` fields lose the same response columns, ``(N,)`` fields keep
        their rows."""
        mb, r = trim(self.rollout.select(idx))
        rows = {name: t[idx][:, :r] if t.dim() == 2 else t[idx] for name, t in self.aligned()}
        return replace(self, rollout=mb, **rows)

    def to(self, device: torch.device | str) -> Experience:
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})  # fmt: skip


def trim(mb: Rollout) -> tuple[Rollout, int]:
    """A rollout without its all-pad prompt columns (left) and response columns after its longest
    response (at least one column kept); returns it and its response width ``r``."""
    r = max(1, int(mb.response_mask.sum(-1).max()))
    used = mb.prompt_mask.any(0).nonzero()
    p0 = int(used[0]) if len(used) else 0
    trimmed = Rollout(
        prompt_ids=mb.prompt_ids[:, p0:],
        prompt_mask=mb.prompt_mask[:, p0:],
        response_ids=mb.response_ids[:, :r],
        response_mask=mb.response_mask[:, :r],
        logprobs=mb.logprobs[:, :r],
        finished=mb.finished,
        prompt_index=mb.prompt_index,
    )
    return trimmed, r
