"""Rollout: batched sampling with a KV cache (`generate` -> `Rollout`), the colocated vLLM engine
(`vllm_engine.VLLMEngine`, imported lazily: vLLM is an optional extra) and reward scorers."""

from lightning_rlhf.rollout import static_decode
from lightning_rlhf.rollout.experience import Experience
from lightning_rlhf.rollout.generate import (
    GenerationSpec,
    Rollout,
    VLLMSpec,
    eval_mode,
    filter_logits,
    generate,
    left_pad,
    sample_categorical,
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
    "Experience",
    "GenerationSpec",
    "RewardFunctionScorer",
    "RewardModelScorer",
    "Rollout",
    "Scorer",
    "VLLMSpec",
    "eval_mode",
    "filter_logits",
    "generate",
    "import_function",
    "last_token_scores",
    "left_pad",
    "sample_categorical",
    "sample_next",
    "static_decode",
]
