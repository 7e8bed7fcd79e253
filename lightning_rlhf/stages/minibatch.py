"""The optimisation phase of the online stages: optimisers and schedules, the agreed plan of
epochs x mini-batches x micro-batches, gradient accumulation (sync-free but for the last
micro-batch), clipping, non-finite handling, and the Trainer options that manual optimisation rules out.

:class:`MinibatchOptimisation` is a mixin of :class:`~lightning_rlhf.stages.online.OnlineRLModule`
(a ``LightningModule`` with ``automatic_optimization = False``). It reads the module's ``optim``,
``schedule_steps``, ``micro_batch_tokens``, ``rollout_step``, ``generator`` and ``_nonfinite_rewards_at``, and writes
``_schedulers`` (under Fabric) and ``_policy_version`` (the vLLM engine's sync clock). One PPO update
reads, top to bottom::

    stats = self.optimise_minibatches(experience, self.ppo_loss, [(actor_opt, clip), (critic_opt, clip)],
                                      epochs=..., mini_batch_size=..., micro_batch_size=...)
    # for each epoch, mini-batch: for each micro-batch: loss_fn(experience.select(idx)) -> backward
    #                             then clip_and_step every optimiser; then the LR schedules advance
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch

from ..models.distributed import all_reduce, fsdp_gradient_sync, world_size
from ..rollout import Rollout
from ..rollout.experience import Experience
from .common import build_optimizer, build_scheduler, grads_finite, total_training_steps


class MinibatchOptimisation:
    """Optimisers, LR schedules and the mini-batch loop of an online stage (a mixin)."""

    def build_actor_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW on ``trainable_parameters()`` with the ``optim`` schedule over rollout steps."""
        opt = build_optimizer(self.trainable_parameters(), self.optim, fused=self._fused_adamw_ok())
        return opt, build_scheduler(opt, self.optim, self.total_rollout_steps())

    def total_rollout_steps(self) -> int:
        return self.schedule_steps or total_training_steps(self)

    def configure_optimizers(self):
        opt, sched = self.build_actor_optimizer()
        self._schedulers = [sched]
        return [opt], [sched]

    def schedulers(self) -> list:
        """The LR schedulers, under a Trainer (``self.lr_schedulers()``) or Fabric (as configured)."""
        if self._fabric is not None or self._trainer is None:
            return list(self._schedulers)
        scheds = self.lr_schedulers()
        return [] if scheds is None else list(scheds) if isinstance(scheds, list) else [scheds]

    def rows_per_forward(self, rows: int | None, rollout: Rollout) -> int:
        """Rows of ``rollout`` per forward: ``rows`` when given, else as many of its padded rows as fit in
        ``micro_batch_tokens`` tokens (at least one), or all of them when that is None. Memory grows with
        the padded tokens of a forward (activations for the backward, vocabulary-sized logits), so a
        rollout of any size trains in bounded memory."""
        if rows is not None:
            return rows
        if self.micro_batch_tokens is None:
            return max(1, len(rollout))
        width = rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]
        return max(1, self.micro_batch_tokens // max(1, width))

    def optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def clip_and_step(self, optimizer, max_grad_norm: float | None) -> None:
        """Clip the gradients to ``max_grad_norm`` (of the unscaled gradients), step, zero."""
        if max_grad_norm:
            self.clip_grad_norm(optimizer, max_grad_norm * self._loss_scale())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if optimizer is self.optimizer_list()[0]:  # the actor's (first) optimiser: the policy moved
            self._policy_version += 1
            if self._sampler_copy is not None:  # generation.dtype: the sampling copy follows, in place
                self.update_sampler_copy()

    def _grad_scaler_enabled(self) -> bool:
        """Whether a GradScaler (``16-mixed``) of the Trainer or of Fabric scales the gradients."""
        if self._fabric is not None:
            plugin = getattr(self._fabric, "_precision", None)
        else:
            plugin = self.trainer.precision_plugin if self._trainer is not None else None
        scaler = getattr(plugin, "scaler", None)
        return scaler is not None and scaler.is_enabled()

    def _loss_scale(self) -> float:
        """The GradScaler's current scale when the gradients are still scaled at clipping time, else 1.

        Under a Trainer with ``16-mixed`` and manual optimisation, Lightning unscales the gradients
        only inside ``optimizer.step()``, after ``clip_gradients`` (Lightning issue #18089), and a
        second ``unscale_`` there would raise. Clipping the scaled gradients at ``max_grad_norm *
        scale`` is the same clip as ``max_grad_norm`` on the unscaled ones (the norm scales
        linearly); non-finite gradients stay non-finite, so the scaler still skips that step.
        Fabric's ``clip_gradients`` unscales first by itself: 1 there.
        """
        if self._fabric is not None or self._trainer is None:
            return 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def minibatches(self, n: int, mini_batch_size: int | None) -> list[torch.Tensor]:
        """A shuffled partition of ``range(n)`` into index tensors of ``mini_batch_size`` (the last
        may be shorter), drawn from the rollout generator."""
        size = mini_batch_size or n
        perm = torch.randperm(n, generator=self.generator, device=self.generator.device).to(self.device)
        return list(perm.split(size))

    def optimise_minibatches(
        self,
        experience: Experience,
        loss_fn: Callable[[Experience], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        optimizers: Sequence[tuple[torch.optim.Optimizer, float | None]],
        *,
        epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        loss_agg: str = "token_mean",
        target_kl: float | None = None,
        has_rows: bool = True,
    ) -> tuple[dict[str, float], int]:
        """The optimisation phase of a rollout step: ``epochs`` x shuffled mini-batches of
        ``mini_batch_size`` rows, each one step of every optimiser, its gradient accumulated over
        micro-batches of ``micro_batch_size`` rows (``manual_backward``); then the LR schedules
        advance once.

        Several processes: every rank runs the same number of forwards, backwards and optimiser
        steps, whatever its row count (GRPO's dynamic sampling keeps a different number of rows per
        rank): the ranks agree on the most mini-batches and micro-batches per mini-batch, and a rank
        with fewer runs zero-weight micro-batches (on its row 0) in their place. Each micro-batch's
        share is taken of the *global* mini-batch (its tokens or rows over all ranks' , times the
        world size, since DDP and FSDP2 average gradients), so the step equals one process's step on
        the union of the ranks' rows. The gradients of all but the last micro-batch of a mini-batch
        are accumulated without synchronisation (``no_sync`` / FSDP2's
        ``set_requires_gradient_sync``; see ``sync_free_accumulation``). ``target_kl`` compares the
        mean ``approx_kl`` over every rank's micro-batches, so all ranks stop after the same epoch.

        Args:
            experience: the ``N`` rows trained on (the rollout and its aligned tensors).
            loss_fn: ``loss_fn(mb) -> (loss, stats)`` on one micro-batch: ``mb`` the experience's rows
                of that micro-batch (``Experience.select``: trimmed to the columns they use);
                ``stats`` maps metric names to scalar tensors.
            optimizers: ``(optimizer, max_grad_norm)`` pairs, clipped and stepped in this order after
                each mini-batch (``clip_and_step``; ``max_grad_norm`` None: no clipping).
            epochs: passes over the rollout.
            mini_batch_size: rows per optimiser step (None: all).
            micro_batch_size: rows per forward and backward (None: ``rows_per_forward``, as many as
                fit in ``micro_batch_tokens`` padded tokens).
            loss_agg: the losses' reduction; it fixes each micro-batch's share of the mini-batch
                loss (its tokens for ``token_mean``, its rows otherwise), so that the accumulated
                gradient is that of the whole mini-batch.
            target_kl: stop after an epoch whose mean ``train/approx_kl`` exceeds it (None: off).
            has_rows: False when this rank has nothing to train on but others do: it then only
                runs the agreed zero-weight micro-batches and steps.

        Returns:
            ``(stats, epochs_done)``: the mean of each statistic over this rank's micro-batches, and
            the epochs run.
        """
        mask = experience.response_mask
        world = world_size()
        history: dict[str, list[torch.Tensor]] = defaultdict(list)
        n = len(experience) if has_rows else 0
        size = mini_batch_size or len(experience)
        micro = min(size, self.rows_per_forward(micro_batch_size, experience.rollout))
        # the agreed plan: most mini-batches per epoch, most micro-batches per mini-batch
        plan = torch.tensor([math.ceil(n / size), math.ceil(min(n, size) / micro)], device=self.device)
        n_mini, n_micro = (int(v) for v in all_reduce(plan, "max"))
        dummy = torch.zeros(1, dtype=torch.long, device=self.device)  # row 0, trained with weight 0
        epochs_done = 0
        for _epoch in range(epochs):
            kl_sum, kl_count = torch.zeros((), device=self.device), 0
            local = self.minibatches(n, mini_batch_size) if has_rows else []
            for j in range(n_mini):
                mb_idx = local[j] if j < len(local) else dummy[:0]
                micro_idx = list(mb_idx.split(micro)) if len(mb_idx) else []
                # the mini-batch's loss normaliser over every rank: its tokens or rows
                denom = mask[mb_idx].sum() if loss_agg == "token_mean" else torch.tensor(len(mb_idx), device=self.device)
                denom = all_reduce(denom.to(self.device, torch.float32), "sum").clamp(min=1) / world
                loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)  # any micro-batch's loss NaN/inf
                for k in range(n_micro):
                    idx = micro_idx[k] if k < len(micro_idx) else dummy
                    mb = experience.select(idx)
                    loss, stats = loss_fn(mb)
                    loss_bad = loss_bad | ~torch.isfinite(loss.detach()).all()
                    real = k < len(micro_idx)
                    # weight so that the accumulated gradient is that of the whole mini-batch's loss
                    count = mb.response_mask.sum() if loss_agg == "token_mean" else len(idx)
                    share = count / denom if real else 0.0
                    with self.gradient_sync(k == n_micro - 1):
                        self.manual_backward(loss * share)
                    if real:
                        for key, v in stats.items():
                            history[key].append(v)
                        if target_kl is not None:
                            kl_sum, kl_count = kl_sum + stats["train/approx_kl"].detach(), kl_count + 1
                if self.skip_nonfinite_step(loss_bad, [opt for opt, _ in optimizers]):
                    for opt, _ in optimizers:
                        opt.zero_grad(set_to_none=True)
                else:
                    for opt, max_grad_norm in optimizers:
                        self.clip_and_step(opt, max_grad_norm)
            epochs_done += 1
            if target_kl is not None:
                total = all_reduce(torch.stack([kl_sum.float(), torch.tensor(float(kl_count), device=self.device)]))
                if float(total[0] / total[1].clamp(min=1)) > target_kl:
                    break
        for sched in self.schedulers():
            sched.step()
        out = {k: float(torch.stack(v).float().mean()) for k, v in history.items()}
        out["train/nonfinite_skipped"] = float(self.nonfinite_skipped)
        return out, epochs_done

    def skip_nonfinite_step(self, loss_bad: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether to skip the optimiser steps of this mini-batch (every optimiser; decided on every rank
        alike by ``StageModule.nonfinite_step``): the rollout's rewards were non-finite, or a micro-batch's
        loss (``loss_bad``) or a gradient is, here or on another rank. With ``optim.nonfinite: stop`` it
        raises instead, naming what and the rollout step.

        Under ``16-mixed`` (a GradScaler), overflowed gradients are the scaler's to handle (it skips that
        step and lowers its scale), so only the loss is checked there."""
        if self._nonfinite_rewards_at == self.rollout_step:  # agreed and counted when scored
            return True
        what = "loss" if bool(loss_bad) else None
        if what is None and not self._grad_scaler_enabled():
            params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
            what = None if grads_finite(params) else "gradients"
        return self.nonfinite_step(what, f"rollout step {self.rollout_step + 1}")

    sync_free_accumulation: bool = True
    """Accumulate the gradients of a mini-batch's micro-batches without synchronising them across
    ranks, except on the last one (one all-reduce per optimiser step instead of one per micro-batch).
    False: every backward synchronises (the same result, slower; kept for comparison)."""

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Whether the backward passes in the block synchronise gradients across ranks. Off: DDP's
        ``no_sync`` (the Trainer strategy's ``block_backward_sync``) and FSDP2's
        ``set_requires_gradient_sync(False)`` on every sharded module. A no-op on one process and
        with ``sync_free_accumulation`` off."""
        if enabled or not self.sync_free_accumulation or world_size() == 1:
            yield
            return
        with contextlib.ExitStack() as stack:
            if self._trainer is not None and self._fabric is None:
                from lightning.pytorch.strategies import ParallelStrategy

                if isinstance(self.trainer.strategy, ParallelStrategy):
                    stack.enter_context(self.trainer.strategy.block_backward_sync())
            ddp = self.fabric_ddp()
            if ddp is not None:
                stack.enter_context(ddp.no_sync())
            stack.enter_context(fsdp_gradient_sync(self, False))
            yield

    _fabric_ddp_ref: Callable | None = None  # a weak reference, set by lightning_rlhf.fabric.FabricRunner

    def fabric_ddp(self):
        """The ``DistributedDataParallel`` wrapping this module under Fabric's DDP (None otherwise)."""
        return self._fabric_ddp_ref() if self._fabric is not None and self._fabric_ddp_ref is not None else None

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """``loss.backward()`` through the Trainer's strategy or ``fabric.backward``. Under Fabric's DDP
        the backward runs inside ``training_step``, outside any ``DistributedDataParallel.forward``,
        so the reducer is told to expect this backward first (as Lightning's manual optimisation does
        under the Trainer); without it DDP would not all-reduce these gradients."""
        ddp = self.fabric_ddp()
        if ddp is not None:
            from lightning.pytorch.overrides.distributed import prepare_for_backward

            prepare_for_backward(ddp, loss)
        super().manual_backward(loss, *args, **kwargs)


def reject_optimiser_step_options(trainer, stage: str) -> None:
    """Raise a ``ValueError`` naming the option and what to use instead when the Trainer is set to
    count ``trainer.global_step``: under manual optimisation it counts every optimiser step (actor
    and critic, times epochs and mini-batches), not rollout steps."""
    why = (
        f"{stage} optimises by hand: trainer.global_step counts every optimiser step (each optimiser, "
        "times epochs and mini-batches of a rollout), not rollout steps (prompt batches)"
    )
    for name in ("max_steps", "min_steps"):
        value = getattr(trainer, name, None)
        if value not in (None, -1):
            raise ValueError(
                f"trainer.{name}={value} is not supported: {why}. Bound the run in rollout steps with "
                "trainer.max_epochs and trainer.limit_train_batches (rollout steps per epoch) instead"
            )
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        n = getattr(cb, "_every_n_train_steps", 0)
        if n:
            raise ValueError(
                f"ModelCheckpoint(every_n_train_steps={n}) is not supported: {why}. Use "
                "ModelCheckpoint(every_n_epochs=...) or train_time_interval for Lightning checkpoints, "
                f"or {stage}'s save_every_n_steps to export the policy every N rollout steps"
            )
