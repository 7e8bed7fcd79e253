"""What the online stages log and the side effects around it: phase timings, the rollout's metrics
(``rollout/...``, learning rates, the algorithm's ``train/...``), the last samples, and the callbacks
of the module's options (``lightning_rlhf.callbacks``: periodic export, W&B sample tables).

:class:`RolloutLogging` is a mixin of :class:`~lightning_rlhf.stages.online.OnlineRLModule`; it reads
the module's ``kl_ctl``, ``reward_moments``, ``normalize_rewards``, ``uses_reference``,
``rollout_step`` and the options ``log_samples_every_n_steps`` / ``save_every_n_steps``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from lightning import Callback

from ..callbacks import PeriodicExport, SampleTable
from ..core import masked_mean
from ..rollout import Rollout
from ..rollout.scoring import Scores


class RolloutLogging:
    """``timed``, ``rollout_metrics``, ``log_rollout`` and the option callbacks (a mixin)."""

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time the block; logged as ``time/<phase>`` (seconds) by ``log_rollout``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def rollout_metrics(self, rollout: Rollout, scores: Scores, kl: torch.Tensor | None) -> dict[str, float]:
        mask = rollout.response_mask
        metrics = {
            "rollout/reward_mean": float(scores.raw.mean()),
            "rollout/reward_std": float(scores.raw.std()) if len(scores.raw) > 1 else 0.0,
            "rollout/reward_shaped_mean": float(scores.rewards.mean()),
            "rollout/response_len": float(mask.sum(-1).float().mean()),
            "rollout/truncated_frac": float((~rollout.finished).float().mean()),
            "rollout/kl_coef": float(self.kl_ctl.value),
        }
        if kl is not None and self.uses_reference:
            metrics["rollout/kl"] = float((kl * mask).sum(-1).mean())
            metrics["rollout/kl_token"] = float(masked_mean(kl, mask))
        for name, part in scores.parts.items():
            metrics[f"rollout/reward/{name}"] = float(part.nanmean())
        for name, part in scores.diagnostics.items():
            metrics[f"rollout/diag/{name}"] = float(part.nanmean())
        if self.normalize_rewards:
            metrics["rollout/reward_running_mean"] = self.reward_moments.mean
            metrics["rollout/reward_running_std"] = self.reward_moments.std
        return metrics

    def log_rollout(
        self, rollout: Rollout, scores: Scores, kl: torch.Tensor | None, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Log the rollout's metrics, the phase timings, learning rates and ``extra``; keep the samples
        in ``last_samples`` (for the ``SampleTable`` callback). Returns what was logged."""
        metrics = self.rollout_metrics(rollout, scores, kl)
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        for name, opt in zip(self.optimizer_names(), self.optimizer_list(), strict=False):
            metrics[f"train/lr_{name}"] = float(opt.param_groups[0]["lr"])
        metrics.update(extra or {})
        metrics["rollout/step"] = float(self.rollout_step)
        self.log_dict(metrics, batch_size=len(rollout))
        self.log("rollout/reward", metrics["rollout/reward_mean"], prog_bar=True, batch_size=len(rollout))
        self.timings = {}
        self.last_samples = [  # the SampleTable callback's rows
            {"prompt": str(p), "response": c, "reward": float(r)}
            for p, c, r in zip(scores.prompts, scores.completions, scores.raw.tolist(), strict=True)
        ]
        return metrics

    def optimizer_names(self) -> list[str]:
        """Names of the optimisers in ``optimizers()`` order, for the ``train/lr_<name>`` metrics."""
        return ["actor"]

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks of the module's options: ``SampleTable`` (``log_samples_every_n_steps``) and
        ``PeriodicExport`` (``save_every_n_steps``, with ``output_dir``); see ``lightning_rlhf.callbacks``."""
        callbacks: list[Callback] = []
        if self.log_samples_every_n_steps:
            callbacks.append(SampleTable(self.log_samples_every_n_steps))
        if self.save_every_n_steps and self.output_dir:
            callbacks.append(PeriodicExport(self.save_every_n_steps))
        return callbacks

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._fabric is not None:  # Fabric runs no Trainer callbacks: run this module's here
            for callback in self.configure_callbacks():
                callback.on_train_batch_end(None, self, outputs, batch, batch_idx)
