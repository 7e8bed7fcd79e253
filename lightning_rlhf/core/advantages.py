"""Advantage estimators, whitening, per-token KL estimators and KL-coefficient controllers.

All tensors here are *targets*: inputs (rewards, values, log-probs of frozen models) are treated as
constants and outputs are detached, except :func:`kl_penalty`, whose gradient flows through
``logprobs`` so that it can also serve as a loss term (GRPO's KL loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.core.ops import _bool_mask, masked_mean, masked_var, moments_mean_var

__all__ = [
    "gae",
    "whiten",
    "group_centred",
    "flat_groups",
    "group_advantages",
    "kl_penalty",
    "AdaptiveKLController",
    "FixedKLController",
]


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16), over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V_{t+1} = 0`` and ``A_{t+1} = 0`` after the last real token of a row (the episode ends there;
    the same recursion as TRL's and OpenRLHF's ``get_advantages_and_returns`` and cleanrl's
    ``ppo.py``, with the mask applied so padding never leaks in).

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. ``-kl_coef * kl`` on every response token plus
            the sequence score on the last one).
        values: ``(B, T)`` critic values ``V(s_t)``.
        mask: ``(B, T)`` bool/0-1 response mask, right-padded (real tokens first).
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, detached, 0 on padded positions;
        ``returns = advantages + values`` on real tokens (the value-function target).
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)} "
            "must all be (B, T)"
        )
    with torch.no_grad():
        m = _bool_mask(rewards, mask)
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        r = torch.where(m, rewards, zero)  # (B, T)
        v = torch.where(m, values.to(rewards.dtype), zero)  # (B, T)
        T = r.shape[1]
        advantages = torch.zeros_like(r)
        last = torch.zeros_like(r[:, 0])  # A_{t+1}, (B,)
        for t in reversed(range(T)):
            next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            delta = r[:, t] + gamma * next_v - v[:, t]
            # padded positions are zeroed, so A_{t+1} = V_{t+1} = 0 right after the last real token
            last = torch.where(m[:, t], delta + gamma * lam * last, zero)
            advantages[:, t] = last
        returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
    moments: Tensor | None = None,
) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over its real elements (the whole tensor), or
    with the mean and variance of a larger batch it is part of (``moments``).

    Follows TRL's ``masked_whiten``: ``(x - mean) * rsqrt(var + eps)`` with the *unbiased* masked
    variance (Bessel-corrected; pass ``unbiased=False`` for the population variance OpenRLHF uses).
    With ``shift_mean=False`` the mean is added back: only the scale changes (TRL semantics; used
    for rewards, whose sign carries meaning).

    Several processes: pass ``moments = all_reduce(masked_moments(x, mask))`` (every rank's
    ``[count, sum, sum of squares]`` summed) and each rank's ``x`` is whitened with the global mean
    and variance, so that 2 processes x B rows give 1 process x 2B rows (OpenRLHF all-reduces the
    same sums for its advantage normalisation).

    Args:
        x: any shape, typically ``(B, T)`` advantages.
        mask: bool/0-1 broadcastable to ``x``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.
        unbiased: Bessel's correction in the variance.
        moments: ``(3,)`` statistics from :func:`~lightning_rlhf.core.ops.masked_moments` (of ``x``
            and of the rest of the batch); None: ``x``'s own, computed in two passes.

    Returns:
        Same shape as ``x``, 0 on masked positions. With fewer than 2 real elements (unbiased) the
        variance is taken as 0.
    """
    m = _bool_mask(x, mask)
    if moments is None:
        mean = masked_mean(x, m)
        var = masked_var(x, m, unbiased=unbiased)
    else:
        mean, var = (v.to(x.dtype) for v in moments_mean_var(moments.to(x.device), unbiased=unbiased))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


_GROUP_METHODS = ("grpo", "rloo", "reinforce_pp")


def group_centred(rewards: Tensor, group_size: int) -> Tensor:
    """``(N,)`` rewards minus their group's mean, ``r - mean_g`` (groups laid out as in
    :func:`group_advantages`; detached, floating point). REINFORCE++'s batch whitening normalises
    these: their :func:`~lightning_rlhf.core.ops.masked_moments`, summed over ranks, are
    ``group_advantages``' ``moments``."""
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.float()
    g = r.view(-1, group_size)  # (num_prompts, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def flat_groups(rewards: Tensor, group_size: int, atol: float = 1e-6) -> Tensor:
    """Which groups carry no signal: their rewards are all equal, up to ``atol``.

    Args:
        rewards: ``(N,)`` laid out as consecutive groups of ``group_size`` (as in
            :func:`group_advantages`).
        group_size: completions per prompt.
        atol: largest ``max - min`` of a group's rewards that still counts as all equal.

    Returns:
        ``(N / group_size,)`` bool, True for a flat group.
    """
    g = rewards.detach().reshape(-1, group_size)  # (num_prompts, k)
    return (g.max(dim=1).values - g.min(dim=1).values) <= atol


def group_advantages(
    rewards: Tensor,
    group_size: int,
    method: str = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-6,
    flat_atol: float = 1e-6,
    moments: Tensor | None = None,
) -> Tensor:
    """Critic-free, outcome-level advantages from groups of completions of the same prompt.

    ``rewards`` is laid out as consecutive groups: rows ``[g * k, (g + 1) * k)`` are the ``k =
    group_size`` completions of prompt ``g`` (the rollout layout).

    Methods:
        - ``"grpo"`` (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): ``(r - mean_g) / (std_g + eps)``
          with the unbiased group std (``torch.std``, as TRL's GRPO). ``scale_by_std=False`` gives
          ``r - mean_g``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), which
          removes the std's question-difficulty bias. A group of one gets advantage 0.
        - ``"rloo"`` (Ahmadian et al. 2024, "Back to Basics"): ``r_i - mean_{j != i} r_j``
          ``= k / (k - 1) * (r_i - mean_g)``. Needs ``group_size >= 2``.
        - ``"reinforce_pp"`` (Hu 2025, REINFORCE++, the "baseline" variant of OpenRLHF's
          ``reinforce_baseline``): ``a = r - mean_g``, then whitened over the whole batch with the
          population std: ``(a - mean(a)) / (std(a) + eps)``. Needs ``group_size >= 2`` (for plain
          REINFORCE++ without a group baseline, use :func:`whiten` on the rewards). This is the
          sequence-level form; OpenRLHF whitens per token over the response mask, which weighs
          long responses more.

    ``scale_by_std`` only affects ``"grpo"``.

    Flat groups (all rewards equal up to ``flat_atol``, :func:`flat_groups`) get advantage exactly 0
    with every method: ``r - mean_g`` is then only a rounding error, which ``/ (std_g + eps)`` or the
    batch whitening of ``reinforce_pp`` would blow up into a gradient. The other groups' advantages
    are computed as if this rule did not exist (with ``reinforce_pp`` the flat groups still count in
    the batch statistics).

    Args:
        rewards: ``(N,)`` with ``N = num_prompts * group_size``.
        group_size: completions per prompt.
        method: ``"grpo"``, ``"rloo"`` or ``"reinforce_pp"``.
        scale_by_std: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std.
        flat_atol: tolerance of "all rewards equal" (see :func:`flat_groups`); a negative value switches
            the rule off.
        moments: ``reinforce_pp`` only: the ``(3,)`` statistics of the batch it whitens over, the
            :func:`~lightning_rlhf.core.ops.masked_moments` of :func:`group_centred` rewards summed
            over every rank (then 2 processes x B groups equal 1 process x 2B groups); None: this
            batch's own.

    Returns:
        ``(N,)`` advantages (detached, floating point); broadcast them over response tokens with
        ``adv[:, None]`` or pass ``(N,)`` straight to ``ppo_policy_loss``.
    """
    if method not in _GROUP_METHODS:
        raise ValueError(f"group_advantages: method must be one of {_GROUP_METHODS}, got {method!r}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be (N,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards is not a multiple of group_size={group_size}"
        )
    if method in ("rloo", "reinforce_pp") and group_size < 2:
        raise ValueError(f"group_advantages: method={method!r} needs group_size >= 2, got {group_size}")
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.float()
    g = r.view(-1, group_size)  # (num_prompts, k)
    mean = g.mean(dim=1, keepdim=True)  # (num_prompts, 1)
    if method == "grpo":
        adv = g - mean
        if scale_by_std:
            std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
            adv = adv / (std + eps)
    elif method == "rloo":
        baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)  # mean of the other k-1
        adv = g - baseline
    else:  # reinforce_pp
        a = g - mean
        if moments is None:
            adv = (a - a.mean()) / (a.std(unbiased=False) + eps)
        else:  # the global batch's mean and population std
            m, var = (v.to(a.dtype) for v in moments_mean_var(moments.to(a.device), unbiased=False))
            adv = (a - m) / (var.sqrt() + eps)
    flat = flat_groups(g.reshape(-1), group_size, flat_atol)  # (num_prompts,)
    return adv.masked_fill(flat[:, None], 0.0).reshape(-1)


_KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: str = "k1",
    mask: Tensor | None = None,
    clamp: float | None = None,
) -> Tensor:
    """Per-token estimators of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``x = logprobs - ref_logprobs = log(pi / pi_ref)`` (Schulman, "Approximating KL
    Divergence", 2020, whose ``r = pi_ref / pi = exp(-x)``):

    - ``"k1"``: ``x`` — unbiased, high variance, can be negative.
    - ``"k2"``: ``0.5 * x**2`` — biased, low variance, non-negative.
    - ``"k3"``: ``(r - 1) - log r = exp(-x) - 1 + x`` — unbiased, non-negative (computed as
      ``expm1(-x) + x``). Grows like ``exp(-x)`` when ``pi`` puts far less mass than ``pi_ref`` on
      a token; pass ``clamp`` (OpenRLHF uses 10) to bound ``x`` first.
    - ``"abs"``: ``|x|``.

    Everything is computed from the log-ratio, never from ``exp(logprobs) / exp(ref_logprobs)``,
    so log-probs of any magnitude are safe.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy; gradients flow.
        ref_logprobs: ``(B, T)`` under the reference model; treated as a constant (detached).
        kind: ``"k1"``, ``"k2"``, ``"k3"`` or ``"abs"``.
        mask: optional ``(B, T)``; masked positions are 0 (and get zero gradient).
        clamp: optional bound ``c``; ``x`` is clamped to ``[-c, c]`` before the estimator.

    Returns:
        ``(B, T)`` per-token KL estimates (no reduction).
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"kl_penalty: kind must be one of {_KL_KINDS}, got {kind!r}")
    x = logprobs - ref_logprobs.detach()
    if mask is not None:
        m = _bool_mask(x, mask)
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))  # padding: x = 0
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    if kind == "k1":
        out = x
    elif kind == "k2":
        out = 0.5 * x.square()
    elif kind == "k3":
        out = torch.expm1(-x) + x
    else:
        out = x.abs()
    if mask is not None:
        out = torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _as_float(v: float | Tensor) -> float:
    return float(v.detach().item()) if isinstance(v, Tensor) else float(v)


class FixedKLController:
    """Constant KL coefficient; the base of :class:`AdaptiveKLController` (same interface)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No-op; returns ``value``."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        """Only ``value`` is state; everything else is configuration."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value})"


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", sec. 2.2), as in TRL / OpenRLHF:

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``;  ``value <- value * (1 + e * n_steps / horizon)``.

    Args:
        init_kl_coef: starting coefficient ``beta_0``.
        target: target KL (nats per sequence, in the unit you pass to ``update``).
        horizon: ``K_beta``'s inverse: steps (e.g. samples) over which the error is corrected.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Update ``value`` from the observed KL over the last ``n_steps``; returns the new value."""
        error = min(max(_as_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards: ``-kl_coef * kl_t`` on every response token plus the sequence score on
    the last real one (Ziegler et al. 2019, eq. 2; InstructGPT).

    Args:
        scores: ``(B,)`` sequence scores (constants).
        kl: ``(B, T)`` per-token KL estimates (constants), 0 off the mask.
        mask: ``(B, T)`` right-padded response mask.
        kl_coef: the KL penalty coefficient.

    Returns:
        ``(B, T)`` rewards, 0 off the mask; a row without real tokens gets all zeros (its score is
        dropped rather than put on a padded position).
    """
    m = mask.bool()
    rewards = torch.where(m, -kl_coef * kl.detach(), torch.zeros_like(kl))  # (B, T)
    lengths = m.sum(-1)  # (B,)
    last = (lengths - 1).clamp(min=0)  # (B,)
    bonus = torch.where(lengths > 0, scores.detach().to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last[:, None], bonus[:, None])
