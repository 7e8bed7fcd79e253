"""Model loading and preparation: dtype, LoRA, 4-bit, gradient checkpointing, export."""

from .forward import default_position_ids, sequence_logprobs
from .loader import (
    LoraSpec,
    ModelSpec,
    as_spec,
    disable_dropout,
    freeze,
    is_peft,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
)

__all__ = [
    "LoraSpec",
    "ModelSpec",
    "as_spec",
    "disable_dropout",
    "freeze",
    "is_peft",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "save_pretrained",
    "default_position_ids",
    "sequence_logprobs",
]
