"""Helpers of the packed-forward tests (``test_padding_free``, ``test_share_prompt_groups``): tiny random
models of three families (Llama: rotary; GPT-2 and OPT: learned absolute positions, OPT with an offset)
and hand-built ragged rollouts.

Imported as a top-level module: pytest puts this folder on ``sys.path`` for its test files.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_rlhf.rollout.generate import Rollout

V = 48
SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
FAMILIES = {
    "llama": dict(SIZE, intermediate_size=64, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "opt": dict(SIZE, ffn_dim=64, word_embed_proj_dim=32),
}


def build(family: str, attn: str, classifier: bool = False, seed: int = 0, **extra):
    """A tiny random ``family`` model (a one-label classifier with ``classifier``), eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=V, pad_token_id=0, **FAMILIES[family], **extra)
    config._attn_implementation = attn
    if classifier:
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).eval()
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def ragged_rollout(
    prompts: list[torch.Tensor], response_len: list[int], prompt_index: list[int], g
) -> Rollout:
    """A rollout of ``prompts`` (one token tensor per row, left-padded to the longest) and responses of
    ``response_len`` random tokens (right-padded to the longest; a row shorter than that stopped at EOS)."""
    n, p, r = len(prompts), max(len(x) for x in prompts), max(response_len)
    prompt_ids = torch.zeros(n, p, dtype=torch.long)
    prompt_mask = torch.zeros(n, p, dtype=torch.long)
    response_mask = torch.zeros(n, r, dtype=torch.long)
    for i, (ids, b) in enumerate(zip(prompts, response_len, strict=True)):
        prompt_ids[i, p - len(ids) :], prompt_mask[i, p - len(ids) :], response_mask[i, :b] = ids, 1, 1
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(1, V, (n, r), generator=g) * response_mask,
        response_mask=response_mask,
        logprobs=torch.zeros(n, r),
        finished=torch.tensor(response_len) < r,
        prompt_index=torch.tensor(prompt_index),
    )
