"""FSDP2 sharding of Hugging Face models (for Lightning's ``ModelParallelStrategy``) and full-state export."""

from __future__ import annotations

import torch
from torch import nn


def _data_parallel_mesh(mesh):
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_fsdp2(model: nn.Module, device_mesh) -> nn.Module:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules`` classes), then the root.

    Called from a stage's ``configure_model`` when the strategy provides a device mesh.
    Frozen models are sharded the same way (they then need no full copy per rank).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = _data_parallel_mesh(device_mesh)
    for module in fsdp_units(model):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded on their own: instances of the transformers model's ``_no_split_modules``
    classes (its decoder layers), under a peft wrapper too."""
    hf = getattr(model, "base_model", model)
    hf = getattr(hf, "model", hf) if hasattr(model, "peft_config") else hf
    no_split = set(getattr(hf, "_no_split_modules", None) or getattr(model, "_no_split_modules", None) or [])
    if not no_split:
        raise ValueError(f"{type(model).__name__} declares no `_no_split_modules`: cannot choose FSDP2 units")
    return [m for m in model.modules() if type(m).__name__ in no_split]


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU, gathered from every rank (a collective: call on all
    ranks); None for an unsharded model (``save_pretrained`` reads it directly)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
