"""What every stage shares: the optimiser and schedule, the tokenizer, the export at the end of fit."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import os
import shutil
import tempfile
import time
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..errors import ConfigError, NonFiniteError


@dataclass
class OptimSpec:
    """AdamW with warm-up and decay."""

    learning_rate: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimiser steps."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping (None: off). Automatic stages pass it to the Trainer's clipping."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradients (online stages: or rewards) hold NaN/inf: ``skip`` it (no update, on
    every rank; counted as ``train/nonfinite_skipped``) or ``stop`` the run with a message naming what was
    non-finite and the step (``StageModule.nonfinite_step``; every stage)."""


def build_optimizer(params, spec: OptimSpec, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params`` (no weight decay on 1-D ones).

    ``fused``: torch's fused kernel (one pass over each parameter, where the default runs about ten
    elementwise ops per tensor on CPU: ~4x less optimiser time on the 512-hidden benchmark model),
    used when every parameter is a plain floating-point tensor on CPU or CUDA (else the default
    implementation, e.g. for FSDP2's DTensors). Lightning's Trainer refuses to clip the gradients of
    a fused optimiser under its ``MixedPrecision`` plugin (``16-mixed`` and ``bf16-mixed``):
    ``StageModule.clip_grad_norm`` clips them itself under ``bf16-mixed`` (no GradScaler) and passes False under
    ``16-mixed`` (a GradScaler, whose unscaling a fused optimiser does only inside its step)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and bool(params) and all(_fusable(p) for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=spec.learning_rate, betas=tuple(spec.betas), fused=fused or None
    )


def _fusable(p: torch.Tensor) -> bool:
    plain = type(p) in (torch.Tensor, nn.Parameter)  # not a tensor subclass such as DTensor
    return plain and p.is_floating_point() and p.device.type in ("cpu", "cuda")


def check_pair_packing(owner: str, share_prompt: bool, padding_free: bool, packed_length: int | None) -> None:
    """Refuse (``ValueError`` naming the stage and option) pair-packing options that would be ignored or
    are out of range: ``padding_free`` packs the ``share_prompt`` rows, ``packed_length`` sizes them."""
    if padding_free and not share_prompt:
        raise ValueError(f"{owner}: padding_free packs the shared-prompt rows: it needs share_prompt: true")
    if packed_length is not None and not padding_free:
        raise ValueError(f"{owner}: packed_length sizes the packed rows: it needs padding_free: true")
    if packed_length is not None and packed_length < 1:
        raise ValueError(f"{owner}: packed_length must be >= 1 (tokens per packed row), got {packed_length}")


def lr_lambda(spec: OptimSpec, total_steps: int):
    """Multiplier of the peak learning rate at optimiser step ``step``."""
    total = max(1, total_steps)

    def f(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.scheduler == "cosine" else 1 - progress
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape

    return f


def build_scheduler(optimizer, spec: OptimSpec, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))


def total_training_steps(module: LightningModule, fallback: int = 1000) -> int:
    """The optimiser steps (automatic stages) or training batches (online stages) of the run: the
    Trainer's ``estimated_stepping_batches``, or the Fabric runner's ``planned_training_steps``."""
    trainer = getattr(module, "_trainer", None)
    steps = trainer.estimated_stepping_batches if trainer is not None else getattr(module, "planned_training_steps", None)
    return fallback if steps is None or math.isinf(steps) else int(steps)


def _dataclasses_in(annotation) -> list[type]:
    """The dataclass types an annotation names (``OptimSpec | None`` -> ``[OptimSpec]``)."""
    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and is_dataclass(a)]


def _coerce(annotation, value, where: str):
    """A dict given where ``annotation`` names a dataclass becomes that dataclass (recursively)."""
    specs = _dataclasses_in(annotation)
    if isinstance(value, dict) and specs:
        return as_dataclass(specs[0], value, where)
    return value


def as_dataclass(cls, value, where: str = ""):
    """``value`` as a ``cls`` instance: itself, ``cls(**value)`` for a dict (YAML, Python, a checkpoint's
    hparams; nested dataclass fields too), ``cls()`` for None. An unknown key raises
    :class:`~lightning_rlhf.errors.ConfigError` naming it, with close matches."""
    if value is None:
        return cls()
    if not isinstance(value, dict):
        return value
    names = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f" (options: {', '.join(names)})"
        raise ConfigError(f"{where or cls.__name__}: unknown option '{k}' for {cls.__name__}{hint}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints.get(k), v, f"{where}.{k}" if where else k) for k, v in value.items()})


def _init_hints(cls) -> dict:
    """Type hints of the constructor arguments of ``cls`` and of the classes it forwards ``**kwargs`` to."""
    hints: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None and klass.__module__.startswith("lightning_rlhf"):
            try:
                hints.update(typing.get_type_hints(init))
            except Exception:  # an annotation that does not resolve: leave that class out
                continue
    return hints


def plain(obj):
    """Dataclasses (nested in dicts, lists, tuples) turned into dicts."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, dict):
        return type(obj)((k, plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


TRUE_PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


class _NormalisingSpecs(type):
    """Metaclass of the stage modules: before ``__init__`` runs, every argument annotated with a dataclass
    that is given as a dict (Python, YAML, a checkpoint's hparams) becomes that dataclass, and every model
    or tokenizer path is checked (so a missing folder is one clear error before anything is loaded).

    A metaclass rather than a wrapper around ``__init__``: the chain of ``__init__`` frames stays as
    Lightning's ``save_hyperparameters`` expects it."""

    def __call__(cls, *args, **kwargs):
        from ..errors import check_model_path
        from ..models.loader import ModelSpec

        hints = cls.__dict__.get("_spec_hints")
        if hints is None:
            hints = _init_hints(cls)
            cls._spec_hints = hints
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return type.__call__(cls, *args, **kwargs)  # let __init__ report the wrong call itself
        owner = cls.__name__
        arguments = dict(list(bound.arguments.items())[1:])
        params = inspect.signature(cls.__init__).parameters.values()
        var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        required = {p.name for p in params if p.default is inspect.Parameter.empty}
        if var_kw and var_kw in arguments:
            arguments.update(arguments.pop(var_kw))
        for name, value in arguments.items():
            annotation = hints.get(name)
            value = arguments[name] = _coerce(annotation, value, f"{owner} {name}")
            if ModelSpec in _dataclasses_in(annotation) and value is not None:
                path = value.path if isinstance(value, ModelSpec) else value
                option = f"{owner} {name}.path" if isinstance(value, ModelSpec) else f"{owner} {name}"
                if not path and name in required:  # e.g. policy={"lora": {...}} without its path
                    raise ConfigError(f"{option} is empty: name a model folder, a Hub id or a GGUF file")
                check_model_path(path, option)
            elif name == "tokenizer" and isinstance(value, str):
                check_model_path(value, f"{owner} tokenizer", tokenizer=True)
        return type.__call__(cls, **arguments)


class StageModule(LightningModule, metaclass=_NormalisingSpecs):
    """Base of the stage modules: tokenizer, export of the trained model, throughput bookkeeping.

    Subclasses build their models in ``configure_model`` and name the trained one in
    ``exported_model()``; ``output_dir`` (if set) receives a Hugging Face folder at the end of fit.
    """

    data_kind: str = ""
    planned_training_steps: int | None = None
    """Training batches of the run when no Trainer drives the module (set by the Fabric runner, for
    the learning-rate schedule's length)."""

    def __init__(self, tokenizer_path: str, output_dir: str | None, merge_lora: bool = True):
        super().__init__()
        from ..models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.output_dir = output_dir
        self.merge_lora = merge_lora
        self._t_last: float | None = None
        # Frozen models (a reference, a reward model) by name, in a plain dict so that they are not
        # registered as submodules: out of state_dict, the optimiser, DDP and Lightning's dtype/device
        # moves and its "modules in eval mode" check; rebuilt from their folders in configure_model.
        self._frozen: dict[str, nn.Module] = {}

    def exported_model(self) -> nn.Module:
        raise NotImplementedError

    def held_models(self) -> list[nn.Module]:
        """The model this stage trains (``exported_model``) and the frozen ones it holds apart."""
        return [self.exported_model(), *self._frozen.values()]

    @property
    def global_rank(self) -> int:
        """This process's rank under a Trainer or Fabric (Lightning's own property reads the Trainer
        only, so under Fabric every rank would be 0: the same rollout seed, every rank exporting)."""
        return self._fabric.global_rank if self._fabric is not None else super().global_rank

    def true_precision_dtype(self) -> torch.dtype | None:
        """The parameter dtype of a ``*-true`` precision (``bf16-true``: bfloat16, ...) of the
        Trainer or Fabric driving this module; None for mixed or 32-bit precision, or when unattached."""
        if self._fabric is not None:
            precision = self._fabric.strategy.precision.precision
        elif self._trainer is not None:
            precision = self._trainer.precision_plugin.precision
        else:
            return None
        return TRUE_PRECISION_DTYPES.get(str(precision))

    offload_frozen: bool = False
    """Keep the frozen models on the CPU between uses (``frozen_on_device`` moves each one in and out)."""

    def hold_frozen(self, name: str, model: nn.Module) -> nn.Module:
        """Keep ``model`` as the frozen model ``name`` (eval mode, no gradients, not a submodule)."""
        from ..models import freeze

        self._frozen[name] = freeze(model)
        return model

    @contextlib.contextmanager
    def frozen_on_device(self, name: str) -> Iterator[nn.Module | None]:
        """The frozen model ``name`` (None if there is none) on ``self.device`` and in a ``*-true``
        precision's dtype for the block (``place_frozen``); back on the CPU after it when
        ``offload_frozen``. An FSDP2-sharded one stays where its shards are."""
        from ..models.distributed import is_sharded

        model = self._frozen.get(name)
        move = model is not None and not is_sharded(model)
        if model is not None:
            self.place_frozen(model)
        try:
            yield model
        finally:
            if move and self.offload_frozen:
                model.to("cpu")

    def place_frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model that is deliberately not a submodule (a reference, a reward model) onto
        ``self.device``, in the dtype of a ``*-true`` precision: what Lightning does to the
        submodules, which it does not do to these. Cheap when already there. An FSDP2-sharded model
        stays as it is: its shards already live where the strategy put them."""
        from ..models.distributed import is_sharded

        if is_sharded(model):
            return model
        dtype = self.true_precision_dtype()
        if dtype is not None and not getattr(model, "is_quantized", False):
            model.to(dtype=dtype)
        return model.to(self.device)

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2-shard ``model`` when the strategy gives a device mesh (``ModelParallelStrategy``)."""
        mesh = self._device_mesh
        if mesh is None:
            return model
        from ..models.distributed import shard_fsdp2

        return shard_fsdp2(model, mesh)

    def save_pretrained(self, out_dir: str | Path) -> Path | None:
        """Write the trained model and tokenizer as a Hugging Face folder.

        Never writes non-finite weights (raises :class:`~lightning_rlhf.errors.NonFiniteError`), and
        writes atomically: the folder is written under a temporary name next to ``out_dir``, then each
        file is renamed into place, ``config.json`` last, so a folder with a ``config.json`` always holds
        the complete new model (a crash leaves the previous export or nothing). Under FSDP2 every rank
        must call it (the full weights are gathered); rank 0 writes.
        """
        from ..models import save_pretrained
        from ..models.distributed import full_state_dict

        model = self.exported_model()
        state = full_state_dict(model, merge_lora=self.merge_lora)
        if self.global_rank != 0:
            return None
        check_finite(state if state is not None else model.state_dict(), f"an export to {out_dir}")
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            save_pretrained(model, tmp, self.tokenizer, merge_lora=self.merge_lora, state_dict=state)
            out.mkdir(exist_ok=True)
            last = ("config.json", "adapter_config.json")
            for f in sorted(tmp.iterdir(), key=lambda f: f.name in last):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    nonfinite_skipped: int = 0
    """Optimiser steps skipped for a non-finite loss, gradient or reward (``optim.nonfinite: skip``)."""

    def nonfinite_step(self, what: str | None, where: str) -> bool:
        """Whether to skip this optimiser step, the one rule of every stage for non-finite values.

        ``what`` names what is NaN/inf on this rank (``"loss"``, ``"gradients"``, ``"rewards ..."``) or is
        None. The ranks agree (one all-reduce: every rank must call it, in the same order), so a value
        that is non-finite on one rank skips the step on all. Then with ``optim.nonfinite: stop`` it
        raises :class:`~lightning_rlhf.errors.NonFiniteError` naming ``what`` and ``where`` (e.g. ``step
        3``, ``rollout step 2``); with ``skip`` it counts the step in ``nonfinite_skipped`` and returns
        True (the caller then leaves the weights and optimiser state alone)."""
        from ..models.distributed import all_reduce

        bad = torch.tensor(float(what is not None), device=self.device)
        if not bool(all_reduce(bad, "max")):
            return False
        if self.optim.nonfinite == "stop":
            hint = "check the reward model" if (what or "").startswith("rewards") else "lower optim.learning_rate, check the data"
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite {what or 'values on another rank'} at {where} "
                f"(optim.nonfinite='stop'); {hint}, or set optim.nonfinite: skip"
            )
        self.nonfinite_skipped += 1
        return True

    def on_train_end(self) -> None:
        if self.output_dir:
            path = self.save_pretrained(self.output_dir)
            if path is not None:
                rank_zero_info(f"[{type(self).__name__}] saved the trained model to {path}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite(checkpoint.get("state_dict", {}), "a checkpoint")
        # Dataclass arguments as plain dicts: the checkpoint then loads with torch's weights_only=True.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain(checkpoint["hyper_parameters"])

    def _fused_adamw_ok(self) -> bool:
        """Whether the fused AdamW can be clipped here: under a Trainer without a mixed-precision GradScaler
        (fp32, bf16-true, bf16-mixed: where Lightning's ``MixedPrecision`` plugin refuses to clip a fused
        optimiser, ``clip_grad_norm`` clips by itself), or a Fabric without a GradScaler.
        With a GradScaler (16-mixed) the gradients must be unscaled before clipping, which a fused
        optimiser does only inside its step: the for-loop AdamW there. Unknown (no Trainer or Fabric
        attached yet): False."""
        if self._trainer is not None:
            from lightning.pytorch.plugins.precision import MixedPrecision

            plugin = self._trainer.precision_plugin
            return not isinstance(plugin, MixedPrecision) or plugin.scaler is None
        if self._fabric is not None:
            return getattr(getattr(self._fabric, "_precision", None), "scaler", None) is None
        return False

    def clip_grad_norm(self, optimizer, max_norm: float) -> None:
        """Clip ``optimizer``'s gradients to the total norm ``max_norm`` with Lightning's ``clip_gradients``;
        a fused AdamW under ``bf16-mixed`` is clipped here, as Lightning's ``MixedPrecision`` plugin would
        had it not refused fused optimisers (no GradScaler there: the gradients are already unscaled)."""
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and _optimizer_handles_unscaling(optimizer):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def throughput(self, n_tokens: int) -> float | None:
        """Tokens per second since the previous call (None on the first)."""
        now = time.perf_counter()
        last, self._t_last = self._t_last, now
        return None if last is None else n_tokens / max(now - last, 1e-9)


def check_finite(state: dict, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor of ``state`` holding NaN/inf."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"refusing to write {what} with non-finite weights: {name} holds NaN or inf")


def grads_finite(params) -> bool:
    """Whether every gradient of ``params`` is finite (this rank's shard of a sharded one; one sync).

    Read from the total 2-norm (foreach kernels; ~10x cheaper than ``isfinite`` per tensor on the demo
    model, ``scripts/bench_nonfinite.py``): a NaN/inf anywhere makes it NaN/inf. Finite gradients beyond
    ~1e19 overflow it too, and count as non-finite."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


class OfflineStageModule(StageModule):
    """A stage with one loss per batch (SFT, reward model, DPO): automatic optimisation of
    ``exported_model()``'s trainable parameters with ``self.optim``, the schedule stepped per
    optimiser step and gradients clipped to ``optim.max_grad_norm`` (unless the Trainer's
    ``gradient_clip_val`` says otherwise)."""

    optim: OptimSpec
    _loss_nonfinite: bool = False

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._loss_nonfinite = not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, optimizer) -> None:
        # After backward, before clipping and the step: a NaN/inf loss or gradient on any rank skips
        # the step on every rank (grads set to None: AdamW leaves those parameters and their state alone).
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        what = "loss" if self._loss_nonfinite else "gradients" if not grads_finite(params) else None
        if self.nonfinite_step(what, f"step {self.global_step}"):
            for p in params:
                p.grad = None
        self._loss_nonfinite = False
        if self._trainer is not None:
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    def configure_optimizers(self):
        opt = build_optimizer(self.exported_model().parameters(), self.optim, fused=self._fused_adamw_ok())
        sched = build_scheduler(opt, self.optim, total_training_steps(self))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim.max_grad_norm
        if clip:
            self.clip_grad_norm(optimizer, clip)
