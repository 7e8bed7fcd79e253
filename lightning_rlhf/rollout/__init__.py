"""Rollout: batched sampling with a KV cache (`generate` -> `Rollout`) and reward scorers."""

from lightning_rlhf.rollout.generate import (
    GenerationSpec,
    Rollout,
    eval_mode,
    filter_logits,
    generate,
    left_pad,
    sample_next,
)
from lightning_rlhf.rollout.scoring import (
    CompositeScorer,
    RewardFunctionScorer,
    RewardModelScorer,
    Scorer,
    import_function,
    last_token_scores,
)

__all__ = [
    "CompositeScorer",
    "GenerationSpec",
    "RewardFunctionScorer",
    "RewardModelScorer",
    "Rollout",
    "Scorer",
    "eval_mode",
    "filter_logits",
    "generate",
    "import_function",
    "last_token_scores",
    "left_pad",
    "sample_next",
]
