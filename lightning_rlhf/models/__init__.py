"""Model loading and preparation: dtype, LoRA, 4-bit, gradient checkpointing, GGUF files, export."""

from .forward import default_position_ids, sequence_logprobs
from .loader import (
    LoraSpec,
    ModelSpec,
    as_spec,
    disable_dropout,
    freeze,
    gguf_folder,
    is_peft,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
    smollm2_path,
)

__all__ = [
    "LoraSpec",
    "ModelSpec",
    "as_spec",
    "disable_dropout",
    "freeze",
    "gguf_folder",
    "is_peft",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "save_pretrained",
    "smollm2_path",
    "default_position_ids",
    "sequence_logprobs",
]
