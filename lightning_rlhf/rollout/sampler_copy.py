"""A persistent low-precision copy of the policy for the ``hf`` sampler (``GenerationSpec.dtype``).

Sampling an fp32 policy in bf16 any other way re-casts every weight on every decode step (autocast);
the copy is cast once, and after each optimiser step that moved the policy its weights are written
into the same tensors (``SamplerCopy.sync``: ``copy_`` per parameter, no new storage), so a static
decoder kept for the copy (``rollout.static_decode``: keyed by the model and its parameters' storages)
and its captured CUDA graph stay valid.

- A LoRA policy is copied as the plain transformers model with the adapter merged
  (``W + scale * B @ A``, ``models.distributed.policy_weights``: computed out of place, the trained
  model is untouched); the copy has no adapter.
- Parameters are cast to ``dtype``; buffers (e.g. rotary frequencies) keep the policy's dtype, as in
  a model loaded with ``from_pretrained(dtype=...)``.
- Not supported: FSDP2-sharded policies (the copy would be one full model per rank) and quantized
  (4/8-bit) ones (their weights are no plain tensors to cast).

The copy's log-probs are not the trainer's: the stages recompute the old log-probs with the trainer's
forward and log the mismatch as for the vLLM engine (``stages.rollout_engine``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.distributed import is_sharded, policy_weights
from ..models.loader import contiguous_lm_head_input

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SamplerCopy:
    """The policy's weights in ``dtype`` (LoRA merged), as a transformers model used only for sampling.

    Not an ``nn.Module``: kept as a stage attribute, it is no submodule (not in the checkpoint, not
    trained, not moved by Lightning)."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype):
        check_copyable(policy, dtype)
        self.dtype = dtype
        # A copy of the module tree whose parameters are fresh ``dtype`` tensors (deepcopy's memo maps each
        # parameter, tied ones once, to its stand-in): no full-precision clone, no gradients copied. Their
        # values are written by ``sync`` below; a peft wrapper is copied, then unloaded (adapter dropped,
        # the base weights then overwritten with the merged ones).
        memo: dict = {}
        for p in policy.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, dtype=dtype if p.is_floating_point() else p.dtype),
                                           requires_grad=False)  # fmt: skip
        model = copy.deepcopy(policy, memo)
        if model is not _hf_model(model):
            model = model.unload()
        # The prefill's LM head gets the last position only (``logits_to_keep``), a strided ``(N, 1, H)``
        # view, which torch's CPU bf16 matmul would turn into an (N, H, V) copy of the weight (1.4 s per
        # rollout on a h512/V32000 Llama, more than the decode steps): a contiguous input instead.
        contiguous_lm_head_input(model)
        self.model: nn.Module = model.eval()
        self._params = dict(self.model.named_parameters())
        names = {n for n, _ in policy_weights(policy)}
        if names != set(self._params):
            missing, extra = sorted(names - set(self._params)), sorted(set(self._params) - names)
            raise RuntimeError(f"SamplerCopy: the copy's parameters do not match the policy's: {missing[:3]} / {extra[:3]}")
        self.sync(policy)

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """Write the policy's current weights (LoRA merged) into the copy, in place, cast to its dtype."""
        for name, w in policy_weights(policy):
            self._params[name].copy_(w)


def check_copyable(policy: nn.Module, dtype: torch.dtype) -> None:
    """Raise one clear message where a sampling copy of ``policy`` cannot be made."""
    where = f"generation.dtype {str(dtype).removeprefix('torch.')}"
    hf = _hf_model(policy)
    if getattr(hf, "is_quantized", False) or getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False):
        raise ValueError(
            f"{where}: the policy is quantized (4/8-bit), its weights cannot be cast into a sampling copy; "
            "use generation.dtype 'auto'"
        )
    if is_sharded(policy):
        raise ValueError(
            f"{where}: the policy is sharded with FSDP2 and a sampling copy would be one full model per rank; "
            "use generation.dtype 'auto' (or generation.engine 'vllm')"
        )
