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
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        # the models are sharded over the data-parallel ranks only: tensor-parallel ranks would each
        # hold a whole unsynchronised copy and read the same batches (ModelParallelStrategy's default
        # sizes, `auto`, give tensor_parallel_size = devices)
        from ..errors import ConfigError

        dp, tp = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
        raise ConfigError(
            f"ModelParallelStrategy with tensor_parallel_size={tp} (data_parallel_size={dp}): lightning-rlhf "
            "shards its models with FSDP2 over the data-parallel dimension only; set "
            f"data_parallel_size: {dp * tp} and tensor_parallel_size: 1"
        )
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


def full_state_dict(model: nn.Module, merge_lora: bool = False) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU, gathered from every rank (a collective: call on all
    ranks); None for an unsharded model (``save_pretrained`` reads it directly).

    ``merge_lora`` with a peft LoRA model: the merged weights under the base model's names
    (:func:`policy_weights`, gathered one parameter at a time; kept on rank 0 only), which the base
    model's ``save_pretrained`` writes as a full model. Otherwise the peft model's own state dict
    (adapter included), from which peft's ``save_pretrained`` takes the adapter."""
    if not is_sharded(model):
        return None
    if merge_lora and hasattr(model, "get_base_model"):
        keep = rank() == 0
        merged = {}
        for name, w in policy_weights(model):  # every rank iterates: each parameter is a collective
            if keep:
                merged[name] = w.detach().to("cpu", copy=True)
        return merged
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter (lm_head = embed_tokens) once, under its first name, as transformers saves it
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor: ``DTensor.full_tensor()`` (a collective: all ranks call it) or ``t``."""
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the policy's weights under the Hugging Face checkpoint names, streamed
    one parameter at a time (what the vLLM engine's weight sync and a merged FSDP2 export read).

    - A peft LoRA model yields each adapted weight merged, ``W + scale * B @ A`` (peft's
      ``get_delta_weight``), computed out of place: the trained model is not modified.
    - FSDP2-sharded parameters (DTensors) are gathered one at a time with ``full_tensor()``, so at
      most one full parameter exists at once (every rank must iterate, in the same order).
    - Tied weights are yielded once (under the embedding's name).
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_layers = {}
    if hf is not model:  # peft: module name of each LoRA layer -> layer
        from peft.tuners.lora import LoraLayer

        lora_layers = {name: m for name, m in hf.named_modules() if isinstance(m, LoraLayer)}
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in hf.named_parameters(remove_duplicate=False):
            if id(p) in seen:  # tied (lm_head = embed_tokens)
                continue
            seen.add(id(p))
            if ".lora_" in name or "lora_embedding_" in name:
                continue
            module_name, _, pname = name.rpartition(".")
            if module_name.endswith(".base_layer"):
                owner = module_name[: -len(".base_layer")]
                layer = lora_layers.get(owner)
                w = _full(p)
                if layer is not None and not getattr(layer, "merged", False) and not layer.disable_adapters:
                    for adapter in layer.active_adapters:
                        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                            w = w + _full(layer.get_delta_weight(adapter)).to(w.dtype)
                yield f"{owner}.{pname}", w.detach()
            else:
                yield name, _full(p).detach()
