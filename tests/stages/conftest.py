"""Fixtures shared by the stage tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, demo_tokenizer):
    """A tiny random one-label Llama sequence classifier with the demo tokenizer."""
    tok = demo_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
