"""Train any stage module under ``lightning.Fabric``: the runner and ``lightning-rlhf fabric``.

    lightning-rlhf fabric --config configs/demo/sft.yaml [--trainer.devices 2 --trainer.strategy ddp ...]

From Python::

    fabric = build_fabric(accelerator="cpu", devices=1, precision="32-true")
    FabricRunner(fabric, max_steps=10).fit(SFTModule(...), RLHFDataModule(...))

The same modules and YAML as ``lightning-rlhf fit``: ``model:`` and ``data:`` are parsed as there, and
the ``trainer:`` options that mean something to Fabric are mapped onto it (``accelerator``,
``devices``, ``num_nodes``, ``strategy``, ``precision``, ``logger``, ``max_steps``, ``max_epochs``,
``limit_train_batches``). Options that only change what a Trainer shows or evaluates (validation,
callbacks, progress bar) are ignored with a notice; any other option that is set is refused with a
message, rather than silently not applied.

What the runner does for a stage:

- SFT, reward model, DPO (automatic optimisation): ``training_step`` through Fabric's wrapped
  module (DDP's forward), ``fabric.backward``, the module's non-finite check and gradient clipping
  (``optim.max_grad_norm``), the optimiser and the LR schedule, once per batch.
- PPO, GRPO (manual optimisation): ``training_step`` on the module itself under Fabric's autocast; it
  samples, scores and steps its optimisers itself (``manual_backward`` is ``fabric.backward``, and
  under DDP it first prepares the reducer, see ``OnlineRLModule.manual_backward``).
- FSDP2: ``ModelParallelStrategy`` with ``parallelize`` as its ``parallelize_fn`` (the module's
  ``configure_model`` shards its models on the strategy's device mesh).
- ``max_steps`` counts training batches, i.e. optimiser steps for the automatic stages and rollout
  steps for PPO/GRPO (unlike the Trainer's ``global_step``, which counts every optimiser step there).
- Checkpoints: ``fabric.save`` / ``fabric.load`` of the module, optimisers, schedulers, the data
  module's place in the epoch, the online stages' extra state (``online_state_dict``) and the
  runner's counters; sharded (a folder) under FSDP2. Resuming continues with the next batch.
- At the end, the module's export (``on_train_end``: every rank calls it, rank 0 writes).
"""

from __future__ import annotations

import math
import sys
import weakref
from pathlib import Path
from typing import Any

import torch

FABRIC_TRAINER_OPTIONS = (
    "accelerator", "devices", "num_nodes", "strategy", "precision", "logger",
    "max_steps", "max_epochs", "limit_train_batches",
)  # fmt: skip
"""``trainer:`` options mapped onto Fabric and the runner."""

IGNORED_TRAINER_OPTIONS = (
    "callbacks", "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
    "val_check_interval", "check_val_every_n_epoch", "limit_val_batches", "num_sanity_val_steps",
    "limit_test_batches", "limit_predict_batches", "default_root_dir",
)  # fmt: skip
"""``trainer:`` options about validation, display and Trainer callbacks: the runner trains only."""


def parallelize(module, device_mesh):
    """``parallelize_fn`` of Fabric's ``ModelParallelStrategy``: give the stage module the device mesh
    and let its ``configure_model`` build and FSDP2-shard its models (``StageModule.shard``)."""
    module._device_mesh = device_mesh
    module.configure_model()
    return module


def build_fabric(accelerator="auto", devices="auto", num_nodes: int = 1, strategy: Any = "auto",
                 precision: Any = "32-true", loggers=None):
    """A ``lightning.Fabric``. ``strategy`` is a Fabric strategy name or instance, ``"fsdp2"`` (every
    process one data-parallel rank), or a Trainer-style ``{"class_path": "...ModelParallelStrategy",
    "init_args": {...}}`` (FSDP2 with ``parallelize``)."""
    import lightning

    processes = None
    if isinstance(strategy, str) and strategy == "fsdp2":  # the processes Fabric launches, as it parses devices
        probe = lightning.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
        processes = len(probe.strategy.parallel_devices) * num_nodes
    return lightning.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                            strategy=fabric_strategy(strategy, processes), precision=precision, loggers=loggers)


def fabric_strategy(strategy: Any, processes: int | None = None):
    """A Trainer strategy spec as a Fabric strategy (ModelParallelStrategy gets ``parallelize``).
    ``"fsdp2"``: ``data_parallel_size=processes, tensor_parallel_size=1`` (ModelParallelStrategy's
    own default, ``auto``, would make every process a tensor-parallel rank of one data-parallel
    rank, which the stages refuse: they shard over the data-parallel dimension only)."""
    from lightning.fabric.strategies import ModelParallelStrategy

    if isinstance(strategy, str) and strategy == "fsdp2":
        if processes is None:
            raise ValueError("fabric_strategy('fsdp2') needs the number of processes (build_fabric finds it)")
        return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=processes, tensor_parallel_size=1)
    spec = _as_dict(strategy)
    if isinstance(spec, dict) and "class_path" in spec:
        name = spec["class_path"].rsplit(".", 1)[-1]
        if name != "ModelParallelStrategy":
            raise _config_error(
                f"trainer.strategy: {spec['class_path']} has no Fabric counterpart here; use a strategy name "
                "(auto, ddp, ...) or lightning.pytorch.strategies.ModelParallelStrategy (FSDP2)"
            )
        return ModelParallelStrategy(parallelize_fn=parallelize, **dict(spec.get("init_args") or {}))
    return strategy


def _as_dict(value):
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return value.as_dict()
    return value


def _config_error(message: str):
    from .errors import ConfigError

    return ConfigError(message)


class _SchedulerList:
    """The schedulers' states as one checkpoint entry (Fabric calls ``state_dict``/``load_state_dict``)."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def state_dict(self) -> list:
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states: list) -> None:
        for s, state in zip(self.schedulers, states, strict=True):
            s.load_state_dict(state)


def optimizers_and_schedulers(conf) -> tuple[list, list]:
    """The optimisers and schedulers of a ``configure_optimizers`` return value (the forms the stages use:
    a dict with ``lr_scheduler``, ``([opts], [scheds])``, a list of optimisers, or one optimiser)."""
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        sched = sched.get("scheduler") if isinstance(sched, dict) else sched
        return [conf["optimizer"]], [] if sched is None else [sched]
    if isinstance(conf, tuple) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        return list(conf[0]), list(conf[1])
    if isinstance(conf, (list, tuple)):
        return list(conf), []
    return [conf], []


class FabricRunner:
    """Drive a stage module (any of ``lightning_rlhf.stages``) and an ``RLHFDataModule`` under Fabric.

    Args:
        fabric: the ``lightning.Fabric`` (see ``build_fabric``; FSDP2 needs ``parallelize``).
        max_steps: most training batches in all (-1: no limit).
        max_epochs: most passes over the data (None: 1000 without ``max_steps``, as the Trainer).
        limit_train_batches: batches per epoch: an int, or a fraction of the loader (as the Trainer).
        checkpoint_dir: where ``fabric.save`` writes ``last.ckpt`` (at the end, and every
            ``checkpoint_every_n_steps`` batches when set). None: no checkpoints.
        checkpoint_every_n_steps: see ``checkpoint_dir``.
    """

    def __init__(self, fabric, max_steps: int = -1, max_epochs: int | None = None,
                 limit_train_batches: int | float | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every_n_steps: int | None = None):
        self.fabric = fabric
        self.max_steps = -1 if max_steps is None else int(max_steps)
        self.max_epochs = max_epochs if max_epochs is not None else (1000 if self.max_steps == -1 else None)
        self.limit_train_batches = limit_train_batches
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.step = 0  # training batches done
        self.epoch = 0
        self.batch_in_epoch = 0
        self._train_loader = None  # the loader being trained on; its state_dict is the data position

    # --------------------------------------------------------------------------------- set-up

    def fit(self, module, datamodule, ckpt_path: str | Path | None = None):
        """Train ``module`` on ``datamodule``'s training data (resuming from ``ckpt_path``); returns the
        module. Launches Fabric's processes first when it has not been launched yet."""
        if ckpt_path is not None and not Path(ckpt_path).exists():  # before any model is loaded
            raise _config_error(f"ckpt_path: {ckpt_path} does not exist")
        if getattr(self.fabric, "_launched", False):
            return self._fit(self.fabric, module, datamodule, ckpt_path)
        return self.fabric.launch(self._fit, module, datamodule, ckpt_path)

    def batches_per_epoch(self, loader) -> int:
        n = len(loader)
        limit = self.limit_train_batches
        if limit is None:
            return n
        if isinstance(limit, float) and limit <= 1.0:
            return int(n * limit)
        return min(n, int(limit))

    def _fit(self, fabric, module, datamodule, ckpt_path):
        from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

        if getattr(module, "precompute_ref_logps", False):
            raise _config_error(
                "DPOModule precompute_ref_logps is a Trainer feature (it reads the Trainer's loaders); under "
                "the Fabric runner set it to false (the reference is then run per batch)"
            )
        if hasattr(datamodule, "load"):  # RLHFDataModule: with the stage's data kind and tokenizer
            datamodule.load(getattr(module, "data_kind", None) or None, getattr(module, "tokenizer", None))
        else:
            datamodule.setup("fit")
        module.setup("fit")
        raw_loader = datamodule.train_dataloader()
        loader = fabric.setup_dataloaders(raw_loader)
        # Fabric may have rebuilt the loader (with a DistributedSampler): the position saved is that one's
        self._train_loader = loader._dataloader
        per_epoch = self.batches_per_epoch(loader)
        planned = per_epoch * self.max_epochs if self.max_epochs is not None else math.inf
        if self.max_steps >= 0:
            planned = min(planned, self.max_steps)
        module.planned_training_steps = int(planned) if math.isfinite(planned) else None

        if isinstance(fabric.strategy, ModelParallelStrategy):
            model = fabric.setup_module(module)  # parallelize: configure_model + shard
            opts, scheds = optimizers_and_schedulers(module.configure_optimizers())
            opts = fabric.setup_optimizers(*opts) if opts else []
            opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
            module._fabric_optimizers = opts  # what module.optimizers() returns (setup_optimizers does not set it)
        else:
            with fabric.init_module(empty_init=False):
                module.configure_model()
            opts, scheds = optimizers_and_schedulers(module.configure_optimizers())
            model, *opts = fabric.setup(module, *opts)
        if isinstance(fabric.strategy, DDPStrategy) and hasattr(module, "_fabric_ddp_ref"):
            module._fabric_ddp_ref = weakref.ref(model._forward_module)
        if ckpt_path is not None:
            self.load(ckpt_path, model, module, opts, scheds, datamodule)

        manual = not module.automatic_optimization
        done = self.max_steps >= 0 and self.step >= self.max_steps
        while not done and (self.max_epochs is None or self.epoch < self.max_epochs):
            loader._num_iter_calls = self.epoch  # the DistributedSampler's epoch (Fabric sets it per iteration)
            for batch in loader:
                if self.batch_in_epoch >= per_epoch:
                    break
                i = self.batch_in_epoch
                if manual:
                    with fabric.autocast():
                        module.training_step(batch, i)
                else:
                    self.automatic_step(fabric, model, module, opts, scheds, batch, i)
                module.on_train_batch_end(None, batch, i)
                self.step += 1
                self.batch_in_epoch += 1
                n = self.checkpoint_every_n_steps
                if n and self.checkpoint_dir is not None and self.step % n == 0:
                    self.save(self.checkpoint_dir / "last.ckpt", model, module, opts, scheds, datamodule)
                if self.max_steps >= 0 and self.step >= self.max_steps:
                    done = True
                    break
            if not done:
                self.epoch += 1
                self.batch_in_epoch = 0
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir / "last.ckpt", model, module, opts, scheds, datamodule)
        module.on_train_end()  # the export: every rank calls it (FSDP2 gathers), rank 0 writes
        module.teardown("fit")
        return module

    @staticmethod
    def automatic_step(fabric, model, module, opts, scheds, batch, i) -> torch.Tensor | None:
        """One optimiser step of an automatic-optimisation stage, with the module's hooks."""
        loss = model.training_step(batch, i)  # through the strategy's forward (DDP) and autocast
        if loss is None:
            return None
        loss = loss["loss"] if isinstance(loss, dict) else loss
        module.on_before_backward(loss)
        fabric.backward(loss)
        for opt in opts:
            module.on_before_optimizer_step(opt)
            module.configure_gradient_clipping(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in scheds:
            sched.step()
        return loss

    # ---------------------------------------------------------------------------- checkpoints

    def checkpoint_state(self, model, module, opts, scheds, datamodule) -> dict:
        """What ``fabric.save`` writes. Every rank builds it (``online_state_dict`` is a collective)."""
        schedulers = list(scheds) or list(getattr(module, "_schedulers", []))
        state: dict[str, Any] = {"model": model, "schedulers": _SchedulerList(schedulers)}
        for k, opt in enumerate(opts):
            state[f"optimizer_{k}"] = opt
        state["loop"] = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        loader = self._train_loader
        state["data"] = loader.state_dict() if hasattr(loader, "state_dict") else {}
        if hasattr(module, "online_state_dict"):
            state["online"] = module.online_state_dict()
        if hasattr(module, "nonfinite_skipped"):
            state["nonfinite_skipped"] = int(module.nonfinite_skipped)
        return state

    def save(self, path: str | Path, model, module, opts, scheds, datamodule) -> Path:
        path = Path(path)
        self.fabric.save(path, self.checkpoint_state(model, module, opts, scheds, datamodule))
        self.fabric.barrier()
        return path

    def load(self, path: str | Path, model, module, opts, scheds, datamodule) -> None:
        state = self.checkpoint_state(model, module, opts, scheds, datamodule)
        self.fabric.load(path, state)
        loop = state["loop"]
        self.step, self.epoch, self.batch_in_epoch = int(loop["step"]), int(loop["epoch"]), int(loop["batch_in_epoch"])
        if state.get("data") and hasattr(self._train_loader, "load_state_dict"):
            self._train_loader.load_state_dict(state["data"])
        if "online" in state:
            module.load_online_state_dict(state["online"])
        if "nonfinite_skipped" in state:
            module.nonfinite_skipped = int(state["nonfinite_skipped"])


# ------------------------------------------------------------------------------ command line


def build_parser():
    from jsonargparse import ActionConfigFile
    from lightning import LightningModule, Trainer

    from .cli import _parser_class
    from .data import RLHFDataModule

    p = _parser_class()(prog="lightning-rlhf fabric", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config (as for lightning-rlhf fit)")
    p.add_argument("--seed_everything", type=bool | int, default=True)
    p.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    p.add_lightning_class_args(RLHFDataModule, "data")
    p.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
    p.add_argument("--ckpt_path", type=str | None, default=None, help="resume from this checkpoint")
    p.add_argument("--checkpoint_dir", type=str | None, default=None,
                   help="write checkpoints (last.ckpt) here: at the end and every --checkpoint_every_n_steps")
    p.add_argument("--checkpoint_every_n_steps", type=int | None, default=None)
    return p


def trainer_options(trainer: dict, defaults: dict) -> tuple[dict, list[str]]:
    """The Fabric/runner options of a ``trainer:`` section and the ignored options that were set.
    A set option the runner cannot honour raises ``ConfigError`` naming it."""
    changed = {k: v for k, v in trainer.items() if k in defaults and v != defaults[k]}
    refused = [k for k in changed if k not in FABRIC_TRAINER_OPTIONS and k not in IGNORED_TRAINER_OPTIONS]
    if refused:
        hints = {
            "gradient_clip_val": "the stages clip with model optim.max_grad_norm",
            "accumulate_grad_batches": "the online stages accumulate with micro_batch_size",
        }
        detail = "; ".join(f"trainer.{k}: {hints[k]}" for k in refused if k in hints)
        raise _config_error(
            f"trainer.{refused[0]}={changed[refused[0]]!r} is not supported by `lightning-rlhf fabric`"
            + (f" (also: {', '.join('trainer.' + k for k in refused[1:])})" if refused[1:] else "")
            + f". It maps only {', '.join(FABRIC_TRAINER_OPTIONS)}; use `lightning-rlhf fit` for the rest"
            + (f" ({detail})" if detail else "")
        )
    options = {k: trainer.get(k, defaults.get(k)) for k in FABRIC_TRAINER_OPTIONS}
    ignored = [k for k in changed if k in IGNORED_TRAINER_OPTIONS and changed[k] not in (None, [], False)]
    return options, ignored


def _instantiate(spec):
    """A ``{"class_path", "init_args"}`` spec (a logger) as an object; other values unchanged."""
    import importlib

    spec = _as_dict(spec)
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**dict(spec.get("init_args") or {}))
    return spec


def loggers_of(logger) -> list:
    if logger in (None, False):
        return []
    if logger is True:
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger("outputs", name="fabric")]
    return [_instantiate(x) for x in (logger if isinstance(logger, list) else [logger])]


def main(argv: list[str] | None = None) -> None:
    import lightning

    from . import cli, stages  # noqa: F401  (stages: short class_path names)

    args = list(sys.argv[1:] if argv is None else argv)
    cli._argv = args  # for the one-line parse errors
    cli.quiet()
    parser = build_parser()
    cfg = parser.parse_args(args)
    trainer_cfg = cfg.trainer.as_dict() if hasattr(cfg.trainer, "as_dict") else dict(cfg.trainer)
    defaults = parser.get_defaults().trainer
    defaults = defaults.as_dict() if hasattr(defaults, "as_dict") else dict(defaults)
    options, ignored = trainer_options(trainer_cfg, defaults)
    if ignored:
        sys.stderr.write(
            f"lightning-rlhf fabric: ignoring {', '.join('trainer.' + k for k in ignored)} "
            "(the Fabric runner trains only: no validation, no Trainer callbacks)\n"
        )
    seed = cfg.seed_everything
    if seed is not False:
        lightning.seed_everything(None if seed is True else int(seed), workers=True, verbose=False)
    init = parser.instantiate_classes(cfg)
    fabric = build_fabric(options["accelerator"], options["devices"], options["num_nodes"] or 1,
                          options["strategy"], options["precision"] or "32-true", loggers_of(options["logger"]))
    runner = FabricRunner(fabric, max_steps=options["max_steps"], max_epochs=options["max_epochs"],
                          limit_train_batches=options["limit_train_batches"], checkpoint_dir=cfg.checkpoint_dir,
                          checkpoint_every_n_steps=cfg.checkpoint_every_n_steps)
    runner.fit(init.model, init.data, ckpt_path=cfg.ckpt_path)
