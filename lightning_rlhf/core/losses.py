"""Losses for SFT, reward modelling, preference optimisation (DPO family, ORPO) and PPO.

Conventions: ``mask`` marks real tokens (bool or 0/1); padded positions never change a loss and
get exactly zero gradient. Tensors from frozen / past models (``ref_*``, ``old_*``), advantages and
returns are constants: they are detached here, so they never receive a gradient.

Reductions (``agg`` of the PPO losses, ``reduction`` of :func:`sft_loss`):

- ``"token_mean"``: sum over all real tokens of the batch / number of real tokens (DAPO's
  token-level loss, Yu et al. 2025).
- ``"seq_mean_token_mean"``: mean over tokens within each sequence, then mean over the sequences
  that have at least one real token (the original PPO-for-LLMs / GRPO form).
- ``"seq_mean_token_sum"``: sum over tokens within each sequence / ``max_len``, then mean over all
  ``B`` rows: a constant normaliser ``B * max_len`` (Dr. GRPO, Liu et al. 2025), with ``max_len``
  defaulting to ``T``; set it to the generation budget so it does not change with padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlhf.core.ops import _bool_mask, logprobs_from_logits, masked_mean, masked_sum

__all__ = [
    "aggregate_loss",
    "sft_loss",
    "reward_loss",
    "dpo_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "value_loss",
]

_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate_loss(x: Tensor, mask: Tensor, agg: str, max_len: int | None = None) -> Tensor:
    """Reduce per-token values to a scalar loss over the real tokens (see the module docstring).

    Args:
        x: ``(B, T)`` per-token values (e.g. a per-token policy loss or KL); values off the mask
            never count (nor get a gradient).
        mask: ``(B, T)`` bool/0-1, 1 on real tokens.
        agg: ``"token_mean"`` (``sum / number of real tokens``), ``"seq_mean_token_mean"`` (mean per
            row, then mean over the rows with at least one real token) or ``"seq_mean_token_sum"``
            (``sum / (B * max_len)``).
        max_len: the constant normaliser of ``"seq_mean_token_sum"`` (e.g. the generation budget);
            None: ``T``.

    Returns:
        A scalar; 0 when there is no real token (or no row).
    """
    m = _bool_mask(x, mask)
    if agg == "token_mean":
        return masked_mean(x, m)
    if agg == "seq_mean_token_mean":
        per_seq = masked_mean(x, m, dim=-1)  # (B,), 0 for an all-masked row
        has_tokens = m.any(dim=-1)  # (B,)
        return masked_mean(per_seq, has_tokens)
    if agg == "seq_mean_token_sum":
        norm = x.shape[-1] if max_len is None else max_len
        return masked_sum(x, m) / (x.shape[0] * norm) if x.shape[0] > 0 else x.new_zeros(())
    raise ValueError(f"agg must be one of {_AGG_MODES}, got {agg!r}")


def _zeros_where(m: Tensor, x: Tensor) -> Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------

_SFT_REDUCTIONS = ("token_mean", "sum", "seq_mean", "none")


def sft_loss(logits: Tensor, labels: Tensor, mask: Tensor, reduction: str = "token_mean") -> Tensor:
    """Next-token cross-entropy: ``-log p(labels[:, t] | logits[:, t - 1])`` on the target tokens.

    ``mask`` is aligned with ``labels`` (the collator's ``loss_mask``): ``mask[:, t] = 1`` means
    ``labels[:, t]`` is a target, predicted from ``logits[:, t - 1]``; ``mask[:, 0]`` is ignored
    (nothing predicts the first token). Log-probs come from :func:`logprobs_from_logits` (fp32,
    chunked), so bf16 logits are fine.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` long (usually ``input_ids``).
        mask: ``(B, T)`` bool/0-1 target mask.
        reduction: ``"token_mean"`` (mean over all target tokens of the batch), ``"sum"``,
            ``"seq_mean"`` (mean per sequence, then over sequences with at least one target) or
            ``"none"``.

    Returns:
        A scalar, or for ``"none"`` the ``(B, T)`` per-token losses aligned with ``labels``
        (0 where ``mask`` is 0 and in column 0). 0 when there is no target at all.
    """
    if reduction not in _SFT_REDUCTIONS:
        raise ValueError(f"sft_loss: reduction must be one of {_SFT_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 3 or logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"sft_loss: logits {tuple(logits.shape)} must be (B, T, V), labels {tuple(labels.shape)} "
            f"and mask {tuple(mask.shape)} (B, T)"
        )
    m = _bool_mask(labels, mask)[:, 1:]  # (B, T-1) targets labels[:, 1:]
    # logits[:, :-1] is a strided view; logprobs_from_logits walks it row block by row block.
    logp = logprobs_from_logits(logits[:, :-1], labels[:, 1:])  # (B, T-1) fp32
    nll = _zeros_where(m, -logp)  # (B, T-1)
    if reduction == "token_mean":
        return masked_mean(nll, m)
    if reduction == "sum":
        return nll.sum()
    if reduction == "seq_mean":
        return aggregate_loss(nll, m, "seq_mean_token_mean", None)
    return F.pad(nll, (1, 0))  # (B, T), column 0 has no prediction


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley-Terry pairwise loss for reward models (Ouyang et al. 2022, eq. 1; the margin of
    Touvron et al. 2023, Llama 2; the centering term of Eisenstein et al. 2023, as TRL's
    ``center_rewards_coefficient``):

    ``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r) ** 2)``.

    Args:
        chosen_rewards: ``(B,)`` scores of the chosen responses.
        rejected_rewards: ``(B,)`` scores of the rejected responses.
        margin: optional ``(B,)`` or float; the chosen must beat the rejected by this much.
        center_coef: weight of the term that pulls rewards towards zero mean.

    Returns:
        Scalar loss (mean over the batch).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"reward_loss: chosen {tuple(chosen_rewards.shape)} vs rejected {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - (margin.to(diff.dtype) if isinstance(margin, Tensor) else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).square().mean()
    return loss


# --------------------------------------------------------------------------------------------
# Preference optimisation
# --------------------------------------------------------------------------------------------

_DPO_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses, per example.

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (summed sequence log-probs) and ``eps =
    label_smoothing``:

    - ``"sigmoid"`` — DPO (Rafailov et al. 2023, eq. 7): ``-logsigmoid(beta * h)``; with ``eps > 0``
      conservative DPO (cDPO, Mitchell 2023): ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``.
    - ``"robust"`` — Chowdhury et al. 2024 (provably robust DPO, eq. 8), unbiased under label-flip
      rate ``eps < 0.5``: ``(-(1 - eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)``.
    - ``"ipo"`` — Azar et al. 2023 (IPO, eq. 17): ``(h - 1 / (2 beta)) ** 2``. The paper (and TRL)
      use *length-averaged* log-probs here; pass those if you follow it.
    - ``"hinge"`` — SLiC-style (Zhao et al. 2023): ``relu(1 - beta * h)``.
    - ``"simpo"`` — SimPO (Meng et al. 2024, eq. 6), reference-free: pass *length-normalised*
      policy log-probs; ``h = pi_c - pi_r``, loss ``-logsigmoid(beta * h - gamma)`` (with ``eps``
      smoothing as in cDPO). ``ref_*`` may be None and are ignored.

    Rewards (for logging, detached): ``beta * (policy - ref)`` per response; ``beta * policy`` for
    SimPO. ``ref_*`` are constants (detached).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` sequence log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` under the reference; None only for simpo.
        beta: inverse temperature (DPO's beta; SimPO's beta, typically 2-2.5).
        loss_type: one of ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``, ``"simpo"``.
        label_smoothing: ``eps`` in [0, 0.5); only for sigmoid, robust and simpo.
        gamma: SimPO's target reward margin (TRL's ``simpo_gamma``); unused otherwise.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; reduce ``losses`` with
        ``.mean()``.
    """
    if loss_type not in _DPO_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {_DPO_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"dpo_loss: label_smoothing is not defined for loss_type={loss_type!r}")
    eps = label_smoothing
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    if loss_type == "simpo":
        logits = beta * pi_logratios - gamma
        losses = -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps
        chosen_rewards = beta * policy_chosen_logps.detach()
        rejected_rewards = beta * policy_rejected_logps.detach()
        return losses, chosen_rewards, rejected_rewards
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs reference log-probs")
    ref_c, ref_r = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    h = pi_logratios - (ref_c - ref_r)  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_c).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_r).detach()
    return losses, chosen_rewards, rejected_rewards


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps_mean: Tensor, rejected_logps_mean: Tensor, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), per example.

    ``log odds(y) = logp - log(1 - exp(logp))`` with ``logp`` the length-averaged log-prob;
    ``losses = -beta * logsigmoid(log odds(y_c) - log odds(y_r))``. The full ORPO objective is
    ``sft_nll + losses.mean()`` (TRL returns ``beta * logsigmoid(...)`` and subtracts it; same thing).
    ``log(1 - exp(logp))`` is computed stably, with ``logp`` clamped just below 0.

    Args:
        chosen_logps_mean, rejected_logps_mean: ``(B,)`` mean per-token log-probs of each response.
        beta: weight of the odds-ratio term (the paper's lambda).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are
        ``beta * logps_mean``, detached (TRL's convention).
    """
    tiny = torch.finfo(chosen_logps_mean.dtype).tiny
    lc = chosen_logps_mean.clamp(max=-tiny)
    lr = rejected_logps_mean.clamp(max=-tiny)
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))  # (B,)
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_logps_mean.detach(), beta * rejected_logps_mean.detach()


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    max_len: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, then aggregated.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``l = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))``.

    - ``clip_eps_high``: asymmetric upper bound, DAPO's clip-higher (Yu et al. 2025, e.g. 0.28);
      defaults to ``clip_eps``.
    - ``dual_clip = c > 1``: for ``A < 0`` the loss is additionally capped at ``-c * A`` (Ye et al.
      2020, dual-clip PPO), bounding the update when the ratio explodes.
    - ``agg``: ``"token_mean"`` (DAPO), ``"seq_mean_token_mean"`` (GRPO), ``"seq_mean_token_sum"``
      (Dr. GRPO; normaliser ``B * max_len``, ``max_len`` defaulting to ``T``); see the module
      docstring.
    - ``token_weights``: constant per-token factors of the surrogate before aggregation, e.g. the
      truncated importance weights of :func:`truncated_importance_weights` (None: all 1).

    Args:
        logprobs: ``(B, T)`` log-probs under the current policy (gradients flow).
        old_logprobs: ``(B, T)`` under the rollout policy; constant.
        advantages: ``(B, T)`` or ``(B,)`` (one per sequence, broadcast over tokens); constant.
        mask: ``(B, T)`` response mask.
        clip_eps, clip_eps_high, dual_clip, agg, max_len: see above.

    Returns:
        ``(loss, stats)``: the scalar loss and detached scalars ``clipfrac`` (fraction of real
        tokens where the clipped term is the active one), ``approx_kl`` (k3 estimate of
        ``KL(old || new)``: ``(r - 1) - log r`` with ``r = exp(logprobs - old_logprobs)``, as in
        cleanrl), ``ratio_mean``, ``ratio_max`` and ``dualclip_frac``.
    """
    if agg not in _AGG_MODES:
        raise ValueError(f"ppo_policy_loss: agg must be one of {_AGG_MODES}, got {agg!r}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1, got {dual_clip}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"ppo_policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"mask {tuple(mask.shape)} must match"
        )
    m = _bool_mask(logprobs, mask)
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1) broadcast over tokens
    adv = adv.to(logprobs.dtype)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # zero the log-ratio on padding first, so garbage there can't make inf * 0 = NaN
    log_ratio = _zeros_where(m, logprobs - old_logprobs.detach())  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg3 < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if token_weights is not None:
        if token_weights.shape != pg.shape:
            raise ValueError(
                f"ppo_policy_loss: token_weights {tuple(token_weights.shape)} must match logprobs {tuple(pg.shape)}"
            )
        pg = pg * token_weights.detach().to(pg.dtype)
    loss = aggregate_loss(_zeros_where(m, pg), m, agg, max_len)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).to(ratio.dtype), m),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": _zeros_where(m, ratio).max() if m.numel() else ratio.new_zeros(()),
            "dualclip_frac": ratio.new_zeros(()),
        }
        if dual_clip is not None:
            stats["dualclip_frac"] = masked_mean(dual_active.to(ratio.dtype), m)
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (the PPO2 baselines / TRL / OpenRLHF form):

    ``v_clip = old + clip(values - old, -clip_eps, clip_eps)``;
    ``l = 0.5 * max((values - R) ** 2, (v_clip - R) ** 2)``, aggregated like the policy loss.
    ``clip_eps=None`` gives the plain ``0.5 * (values - R) ** 2``.

    Args:
        values: ``(B, T)`` current critic values (gradients flow).
        old_values: ``(B, T)`` values at rollout time; constant.
        returns: ``(B, T)`` targets (from :func:`gae`); constant.
        mask: ``(B, T)`` response mask.
        clip_eps: clip range around ``old_values``, or None.
        agg, max_len: as in :func:`ppo_policy_loss` (default ``"token_mean"``).

    Returns:
        ``(loss, stats)`` with detached scalars ``clipfrac`` (fraction of real tokens where the
        clipped error is the larger one) and ``value_mean``.
    """
    if agg not in _AGG_MODES:
        raise ValueError(f"value_loss: agg must be one of {_AGG_MODES}, got {agg!r}")
    if values.shape != old_values.shape or values.shape != returns.shape or values.shape != mask.shape:
        raise ValueError(
            f"value_loss: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
            f"returns {tuple(returns.shape)}, mask {tuple(mask.shape)} must match"
        )
    m = _bool_mask(values, mask)
    v = _zeros_where(m, values)
    ret = _zeros_where(m, returns.detach().to(values.dtype))
    err = (v - ret).square()
    if clip_eps is None:
        per_token = 0.5 * err
        clipfrac = v.new_zeros(())
    else:
        old = _zeros_where(m, old_values.detach().to(values.dtype))
        v_clip = old + (v - old).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - ret).square()
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipfrac = masked_mean((err_clip > err).to(err.dtype), m)
    loss = aggregate_loss(_zeros_where(m, per_token), m, agg, max_len)
    stats = {"clipfrac": clipfrac.detach(), "value_mean": masked_mean(values.detach(), m)}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Engine-vs-trainer mismatch
# --------------------------------------------------------------------------------------------


def truncated_importance_weights(
    trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling (TIS) weights of the tokens a rollout engine sampled.

    The engine (e.g. vLLM in bf16) samples token ``y_t`` from ``q``; the trainer's own forward
    gives ``pi_old(y_t)`` for the same weights. The policy gradient is an expectation under
    ``pi_old``, so each token is reweighted by ``min(pi_old / q, cap) = min(exp(trainer - engine),
    cap)`` (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"); truncation at ``cap`` bounds the variance. The weights are constants (no gradient).

    Args:
        trainer_logprobs: ``(B, T)`` log-probs of the sampled tokens under the trainer's forward of the
            rollout policy.
        engine_logprobs: ``(B, T)`` the engine's log-probs of the same tokens.
        mask: ``(B, T)`` response mask.
        cap: truncation (> 0), e.g. 2.0.

    Returns:
        ``(weights (B, T), stats)``: weights are 0 off the mask; stats (detached scalars over real
        tokens): ``tis_weight_mean``, ``tis_clip_frac`` (share of tokens at the cap),
        ``logprob_diff_mean`` (mean ``|trainer - engine|``) and ``logprob_diff_max``.
    """
    if cap <= 0:
        raise ValueError(f"truncated_importance_weights: cap must be > 0, got {cap}")
    if trainer_logprobs.shape != engine_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(
            f"truncated_importance_weights: trainer_logprobs {tuple(trainer_logprobs.shape)}, engine_logprobs "
            f"{tuple(engine_logprobs.shape)}, mask {tuple(mask.shape)} must match"
        )
    with torch.no_grad():
        m = _bool_mask(trainer_logprobs, mask)
        diff = _zeros_where(m, trainer_logprobs.float() - engine_logprobs.float())  # (B, T)
        raw = torch.exp(diff)
        weights = _zeros_where(m, raw.clamp(max=cap))
        abs_diff = diff.abs()
        stats = {
            "tis_weight_mean": masked_mean(weights, m),
            "tis_clip_frac": masked_mean((raw > cap).float(), m),
            "logprob_diff_mean": masked_mean(abs_diff, m),
            "logprob_diff_max": abs_diff.max() if m.any() else abs_diff.new_zeros(()),
        }
    return weights, stats
