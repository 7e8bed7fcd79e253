"""Lightning callbacks: the online stages' side effects (periodic export, W&B sample tables), and
regional ``torch.compile`` for the offline stages (:class:`CompileLayers`).

The online stages (PPO, GRPO) add them themselves from their options (``save_every_n_steps``,
``log_samples_every_n_steps``) through ``configure_callbacks``, so existing YAML keeps working; a
callback the module returns replaces one of the same type under ``trainer.callbacks`` (Lightning's
rule), so to configure one there, set the module's option to 0 / null. Under the Fabric runner, which
runs no Trainer callbacks, the module calls them from its ``on_train_batch_end``.

Both count rollout steps (``module.rollout_step``, prompt batches), not ``trainer.global_step``
(which, under manual optimisation, counts every optimiser step).
"""

from __future__ import annotations

from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info


class PeriodicExport(Callback):
    """Export the trained model (``module.save_pretrained``) every ``every_n_steps`` rollout steps to
    ``<output_dir>/step-<N>``. Every rank calls the export (FSDP2 gathers the full weights); rank 0
    writes.

    Args:
        every_n_steps: rollout steps between exports.
        output_dir: where the ``step-<N>`` folders go. None: the module's ``output_dir`` (no export
            when that is unset too).
    """

    def __init__(self, every_n_steps: int, output_dir: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"PeriodicExport: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.output_dir = output_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.rollout_step
        out = self.output_dir or pl_module.output_dir
        if out and step % self.every_n_steps == 0:
            path = pl_module.save_pretrained(Path(out) / f"step-{step}")
            if path is not None:
                rank_zero_info(f"[{type(pl_module).__name__}] saved the policy at rollout step {step} to {path}")


class SampleTable(Callback):
    """Every ``every_n_steps`` rollout steps, a table of the last rollout's (step, prompt, response,
    reward) rows (``module.last_samples``, at most ``max_rows``) to every ``WandbLogger``.

    Args:
        every_n_steps: rollout steps between tables.
        max_rows: rows per table.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 16):
        if every_n_steps < 1:
            raise ValueError(f"SampleTable: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.rollout_step
        if step % self.every_n_steps == 0:
            log_sample_table(pl_module.loggers, step, pl_module.last_samples[: self.max_rows])


def log_sample_table(loggers, step: int, samples: list[dict]) -> None:
    """``samples`` (dicts with ``prompt``, ``response``, ``reward``) as the ``rollout/samples`` table of
    every ``WandbLogger`` among ``loggers`` (nothing for other loggers)."""
    from lightning.pytorch.loggers import WandbLogger

    rows = [[step, s["prompt"], s["response"], s["reward"]] for s in samples]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key="rollout/samples", columns=["step", "prompt", "response", "reward"], data=rows)


class CompileLayers(Callback):
    """Regional ``torch.compile`` for SFT, the reward model and DPO: when the fit starts, every decoder
    layer of the trained model and of the frozen ones the stage holds (DPO's reference) is compiled in
    place (``nn.Module.compile``: parameter names and checkpoints stay the same, and identical layers
    share one compiled code, so it compiles once, not once per layer). ``mode`` and ``dynamic`` are
    ``torch.compile``'s.

    Add it to the Trainer's callbacks (YAML: ``trainer.callbacks: [{class_path:
    lightning_rlhf.callbacks.CompileLayers}]``). The first steps are slower while it compiles, and again
    whenever a batch brings a new shape. PPO and GRPO are refused: their policy also samples one token
    at a time, a new shape at every step. What it pays here: ``scripts/bench/train_kernels.py``
    (README, "Benchmarks").
    """

    def __init__(self, mode: str | None = None, dynamic: bool | None = None):
        self.mode, self.dynamic = mode, dynamic

    def on_fit_start(self, trainer, pl_module) -> None:
        from .models.distributed import fsdp_units
        from .stages.common import OfflineStageModule

        if not isinstance(pl_module, OfflineStageModule):
            raise ValueError(f"CompileLayers compiles the offline stages' models (SFT, reward model, DPO), not "
                             f"{type(pl_module).__name__}'s: its policy also samples, a new shape per token")  # fmt: skip
        for model in pl_module.held_models():
            for layer in fsdp_units(model):
                layer.compile(mode=self.mode, dynamic=self.dynamic)
