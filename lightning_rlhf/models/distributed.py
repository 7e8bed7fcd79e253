"""FSDP2 sharding of Hugging Face models (for Lightning's ``ModelParallelStrategy``), full-state export,
and the small collectives with which ranks agree on data-dependent decisions.

The collectives use ``torch.distributed`` directly, so they work the same under a Trainer and under
Fabric; on one process (no process group) they return their input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(x: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """``x`` reduced over every rank (a new tensor; ``x`` itself on one process). Every rank must call
    it, in the same order: it is how ranks agree on a count, a flag or a mean."""
    if world_size() == 1:
        return x
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out = x.detach().clone()
    dist.all_reduce(out, op=ops[op])
    return out


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` on one process). A collective."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if world_size() > 1 else 0


@contextlib.contextmanager
def fsdp_gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn off (``enabled=False``) the gradient reduce-scatter of every FSDP2 unit in ``module`` for
    the block (``set_requires_gradient_sync``): backward passes then accumulate unsharded local
    gradients, reduced by the next backward outside such a block. A no-op without FSDP2 units."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if enabled or not units:
        yield
        return
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


def _data_parallel_mesh(mesh):
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


@contextlib.contextmanager
def gathered_once(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep every FSDP2 unit of ``model`` unsharded from its first forward in the block to the end
    of the block (``set_reshard_after_forward(False)``, then ``reshard()``): a loop of forwards, such
    as token-by-token sampling, all-gathers each layer once instead of once per forward. A no-op
    without FSDP2 units or with ``enabled=False``. The units must have been built resharding after
    forward (``shard_fsdp2``'s default); that setting is restored after the block."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not enabled or not units:
        yield
        return
    inner = [m for m in units if m is not model]  # the root never reshards after forward anyway
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)
        for m in units:
            m.reshard()


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

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter (lm_head = embed_tokens) once, under its first name, as transformers saves it
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state
