"""Pure tensor math for RLHF: masked ops, log-probs, advantages, KL, losses.

Nothing here imports ``torch.nn`` modules, Lightning or transformers; every function takes and
returns tensors (shapes in its docstring), with explicit masks and documented reductions.
"""

from lightning_rlhf.core.advantages import (
    AdaptiveKLController,
    FixedKLController,
    flat_groups,
    gae,
    group_advantages,
    group_centred,
    kl_penalty,
    token_rewards,
    whiten,
)
from lightning_rlhf.core.losses import (
    aggregate_loss,
    dpo_loss,
    orpo_loss,
    ppo_policy_loss,
    reward_loss,
    sft_loss,
    truncated_importance_weights,
    value_loss,
)
from lightning_rlhf.core.ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    moments_mean_var,
)
from lightning_rlhf.core.registry import register_advantage_estimator, register_policy_loss

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "dpo_loss",
    "entropy_from_logits",
    "flat_groups",
    "gae",
    "group_advantages",
    "group_centred",
    "kl_penalty",
    "token_rewards",
    "truncated_importance_weights",
    "logprobs_from_logits",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "moments_mean_var",
    "orpo_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "ppo_policy_loss",
    "reward_loss",
    "sft_loss",
    "value_loss",
    "whiten",
]
