"""What the online RL stages (PPO, GRPO) share: models, rollout, scoring, KL, logging, state.

:class:`OnlineRLModule` is the base of :class:`~lightning_rlhf.stages.ppo.PPOModule` and the GRPO
module. One ``training_step`` receives a batch of prompts and runs, as one method call each::

    rollout = self.generate(batch)                     # sample from the policy (eval mode, KV cache)
    scores = self.score(rollout, batch)                # reward model and/or functions, then shaping
    logprobs = self.policy_logprobs(rollout)           # old log-probs (no grad)
    ref_logprobs = self.reference_logprobs(rollout)    # frozen reference (or the disabled adapter)
    rewards, kl = self.kl_shaped_rewards(scores.rewards, logprobs, ref_logprobs, rollout.response_mask)
    exp = Experience(rollout, old_logprobs=logprobs, ref_logprobs=ref_logprobs, rewards=rewards, ...)
    ...                                                # the algorithm: exp.advantages, then
    self.optimise_minibatches(exp, loss_fn, ...)       # epochs x mini-batches x micro-batches
    self.log_rollout(rollout, scores, kl)

Where each part lives (each a focused file; the module class combines them):

- this file: the constructor's options, the models (policy, frozen reference and reward model),
  scoring and shaping, the no-grad forwards, the KL penalty and controller;
- ``rollout_engine.py`` (:class:`RolloutEngine`): the rollout's generator, ``generate`` with the
  ``hf`` sampler or the vLLM engine, the engine's start/sync/close, the TIS correction;
- ``minibatch.py`` (:class:`MinibatchOptimisation`): optimisers and schedules, the agreed plan of
  epochs x mini-batches x micro-batches over an ``Experience``, accumulation and stepping;
- ``online_logging.py`` (:class:`RolloutLogging`): timings, the rollout's metrics, the callbacks of
  the export / sample-table options;
- ``online_state.py`` (:class:`OnlineCheckpointState`): the extra checkpoint state;
- ``rollout/experience.py`` (:class:`~lightning_rlhf.rollout.Experience`): the data that flows from
  the rollout to each micro-batch's loss; ``rollout/scoring.py``: the reward sources;
  ``core/registry.py``: advantage estimators and policy losses by name.

What a subclass writes (see ``PPOModule``): ``configure_model`` (call ``super()`` first, then build
its own trainable parts, e.g. a critic), ``configure_optimizers`` (``self.build_actor_optimizer()``
plus its own), ``training_step``, and the loss of one micro-batch (``loss_fn(mb: Experience)``) that
it hands to ``optimise_minibatches``. It may extend ``online_state_dict`` / ``load_online_state_dict``
(extra state saved in Lightning checkpoints) and ``trainable_parameters``.

Frozen models (reference, reward model) are deliberately *not* registered as submodules: they stay
out of ``state_dict``, the optimiser, DDP and Lightning's dtype/device moves; they are rebuilt from
their folders in ``configure_model`` and moved to ``self.device`` when used (or to the CPU between
uses with ``offload_frozen``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from ..core import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    token_rewards,
)
from ..models import ModelSpec, as_spec, disable_dropout, load_causal_lm, load_sequence_classifier
from ..models.distributed import (
    all_reduce,
    world_size,
)
from ..models.forward import four_d_mask_refusal
from ..rollout import (
    GenerationSpec,
    RewardFunctionScorer,
    Rollout,
    eval_mode,
)
from ..rollout.scoring import RunningMoments, Scores, build_scorer, import_function
from .common import OptimSpec, StageModule, as_dataclass
from .minibatch import MinibatchOptimisation, reject_optimiser_step_options
from .online_logging import RolloutLogging
from .online_state import OnlineCheckpointState
from .rollout_engine import RolloutEngine


class OnlineRLModule(RolloutEngine, MinibatchOptimisation, RolloutLogging, OnlineCheckpointState, StageModule):
    """Base of the online RL stages: policy, frozen reference and reward, rollout, scoring and KL.

    Uses manual optimisation (``automatic_optimization = False``): the subclass's ``training_step``
    runs the rollout and then ``optimise_minibatches`` with its own loss, which uses
    ``self.manual_backward``, ``self.clip_gradients`` and ``self.schedulers()`` so that Lightning's
    precision and strategy apply. ``trainer.global_step`` therefore counts optimiser steps (of every
    optimiser, times epochs and mini-batches), so the Trainer options counted in it
    (``trainer.max_steps``, ``trainer.min_steps``, ``ModelCheckpoint(every_n_train_steps=...)``) are
    rejected at the start of fit with the alternative: bound a run in rollout steps (prompt
    batches) with ``max_epochs`` / ``limit_train_batches``, export every N rollout steps with
    ``save_every_n_steps``. ``val_check_interval`` and ``log_every_n_steps`` count training batches,
    that is rollout steps, and are fine.

    Args:
        policy: the model trained (folder, dtype, LoRA, 4-bit, gradient checkpointing). Gradient
            checkpointing only acts in the optimisation phase: generation and the no-grad forwards
            run in eval mode, where transformers skips it.
        reward_model: a one-label sequence classifier folder (the RM stage's output). Scores the
            prompt+response ids; it must share the policy's tokenizer.
        reward_functions: import paths of Python reward functions, TRL signature
            ``fn(prompts, completions, **columns) -> list[float | None]`` (columns: the dataset's extra
            fields). Used instead of, or added to, the reward model.
        reward_weights: one weight per reward source, the reward model first (if any), then each
            function. Default all 1.
        diagnostic_functions: import paths of reward functions that are only logged, as
            ``rollout/diag/<name>`` (e.g. the demo's gold reward), never optimised.
        reference: the frozen reference model of the KL penalty. Default: the policy's folder loaded
            again, or with a LoRA policy the policy itself with its adapter disabled (no copy).
        tokenizer: tokenizer folder; default ``policy.path``.
        generation: sampling settings of the rollout, including the engine (``engine: hf | vllm``)
            and the vLLM engine's options (``generation.vllm``: dtype, memory, ``sync_every``...).
            With ``vllm``, the engine is built on the first rollout and gets the policy's weights
            before it and after every ``sync_every`` policy optimiser steps (``time/weight_sync``).
        tis_cap: truncated importance sampling of the engine-vs-trainer mismatch: each token's
            policy-gradient term is multiplied by ``min(exp(old_trainer - engine), tis_cap)``
            (``core.truncated_importance_weights``; e.g. 2.0). None: off. The mismatch
            (``rollout/logprob_diff_mean`` / ``_max``) is logged with ``engine: vllm`` either way.
        kl_coef: KL penalty coefficient (the initial one when ``kl_target`` is set, then > 0). 0
            (no ``kl_target``): no reference model is loaded at all.
        kl_estimator: per-token KL estimator of ``core.kl_penalty``: ``k1`` (log-ratio, the
            InstructGPT/TRL default), ``k2``, ``k3`` or ``abs``.
        kl_target: target KL per sequence (nats) of the adaptive controller (Ziegler et al. 2019);
            None: fixed coefficient.
        kl_horizon: horizon of the adaptive controller, in rollout rows.
        missing_eos_penalty: subtracted from the score of a response that hits ``max_new_tokens``
            without EOS (None: off).
        reward_clip: clip the (normalised) score to ``[-reward_clip, reward_clip]`` (None: off).
        normalize_rewards: normalise scores with a running mean and std over all past rollouts
            (kept in the checkpoint) before clipping.
        optim: the policy's optimiser and learning-rate schedule. The schedule advances once per
            rollout step (per prompt batch, as cleanrl anneals per iteration), ``warmup_steps`` too.
        schedule_steps: rollout steps the learning-rate schedule spans. None: the Trainer's
            estimate of training batches (1000 when driven by Fabric).
        forward_batch_size: rows per no-grad forward (old log-probs, reference, reward, values);
            None: as many as fit in ``micro_batch_tokens``.
        micro_batch_tokens: padded tokens (rows x columns) per forward when ``micro_batch_size``
            (training) or ``forward_batch_size`` (no-grad forwards) is None, so that activation and
            logit memory stays bounded whatever the rollout's size (8192: TRL's default of 8 rows of
            1024 tokens). Gradients are the same whatever the split. None: every row in one forward.
        offload_frozen: keep the reference and reward model on the CPU and move each to the
            accelerator only for its forward (saves accelerator memory; costs transfers).
        seed: seed of the rollout's own ``torch.Generator`` (sampling and mini-batch shuffling; its
            state is checkpointed). Each rank adds its global rank.
        disable_dropout: set every dropout of the policy, critic and reference to 0 (as TRL does), so
            that the first ratio of each rollout is exactly 1 and the KL is not dropout noise.
        log_samples_every_n_steps: every N rollout steps, log a table of (prompt, response, reward)
            to W&B when the logger is a ``WandbLogger`` (0: never): the ``lightning_rlhf.callbacks.SampleTable``
            callback, added by ``configure_callbacks``. The last samples are also kept in
            ``self.last_samples``.
        save_every_n_steps: also export the policy every N rollout steps to
            ``<output_dir>/step-<N>`` (None: only at the end): the ``PeriodicExport`` callback.
        output_dir: where the trained policy is saved as a Hugging Face folder at the end of fit.
        merge_lora: export a LoRA policy merged into its base (else the adapter folder).
        padding_free: run the policy, reference, reward-model and critic forwards of the scoring and
            training phases on packed rows (``core.packing``: each row's real tokens, several rows per packed
            row of at most the longest row's length, a block-diagonal 4D mask, each row's own
            positions) instead of left/right-padded ``(N, P+R)`` rows: the same log-probs and values
            without the padding's compute (TRL's ``padding_free``). Needs ``attn_implementation``
            ``sdpa`` or ``eager`` (refused otherwise); a model whose sliding window is shorter than a
            packed row runs that forward padded. Each rank packs its own micro-batches (one forward
            per micro-batch either way).
        share_prompt: score the rows of a forward that share a prompt (GRPO/RLOO's groups, found by
            content: shuffled mini-batches are fine) in one row ``[prompt, r_1, ..., r_G]`` per prompt
            (``core.prefix.share_prompt_groups``: each response attends to the prompt and, causally,
            to itself, at its own positions), so the prompt is computed once instead of G times: the
            old-policy and reference log-probs and the policy's training forward (the same log-probs,
            entropies and gradients up to float rounding). A forward whose rows all have different
            prompts, or a model whose attention takes no 4D mask (flash-attention, flex, a sliding
            window shorter than the row), runs the separate rows. With ``padding_free`` the shared
            rows are packed. One forward per micro-batch either way. Not with PPO (its critic scores
            the separate rows). Cost: the layers run ``P + G*R`` tokens per group instead of
            ``G*(P + R)``, but the attention takes a dense ``(P + G*R)^2`` mask (no causal fast path),
            so with many long responses and a short prompt it can be slower: measure
            (``scripts/bench/grpo.py --share-prompt``).
    """

    data_kind = "prompt"

    def __init__(
        self,
        policy: ModelSpec | str,
        reward_model: ModelSpec | str | None = None,
        reward_functions: list[str] | None = None,
        reward_weights: list[float] | None = None,
        diagnostic_functions: list[str] | None = None,
        reference: ModelSpec | str | None = None,
        tokenizer: str | None = None,
        generation: GenerationSpec | None = None,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        normalize_rewards: bool = False,
        optim: OptimSpec | None = None,
        schedule_steps: int | None = None,
        forward_batch_size: int | None = None,
        micro_batch_tokens: int | None = 8192,
        offload_frozen: bool = False,
        seed: int = 0,
        disable_dropout: bool = True,
        log_samples_every_n_steps: int = 10,
        save_every_n_steps: int | None = None,
        output_dir: str | None = None,
        merge_lora: bool = True,
        tis_cap: float | None = None,
        padding_free: bool = False,
        share_prompt: bool = False,
    ):
        policy = as_spec(policy)
        super().__init__(tokenizer or policy.path, output_dir, merge_lora)
        if reward_model is None and not reward_functions:
            raise ValueError("give a reward_model, reward_functions, or both")
        n_sources = (reward_model is not None) + len(reward_functions or [])
        if reward_weights is not None and len(reward_weights) != n_sources:
            raise ValueError(
                f"reward_weights has {len(reward_weights)} entries for {n_sources} reward sources "
                "(the reward model first, if any, then each reward function)"
            )
        if kl_target is not None and kl_coef <= 0:
            raise ValueError(
                f"kl_target={kl_target} needs a positive initial kl_coef (GRPO: beta), got {kl_coef}: the "
                "adaptive controller multiplies the coefficient, so from 0 it never moves"
            )
        generation = as_dataclass(GenerationSpec, generation)
        if generation.temperature <= 0:
            raise ValueError(
                f"generation.temperature must be > 0 for RL (got {generation.temperature}): the training "
                "forward scores the samples under softmax(logits / temperature)"
            )
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1 or None (every row in one forward), got {micro_batch_tokens}")
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 (or None: off), got {tis_cap}")
        self.automatic_optimization = False
        self.tis_cap = tis_cap
        self.padding_free = padding_free
        self.share_prompt = share_prompt
        self.policy_spec = policy
        self.reward_spec = as_spec(reward_model) if reward_model is not None else None
        self.reference_spec = as_spec(reference) if reference is not None else None
        self.reward_functions = list(reward_functions or [])
        self.reward_weights = reward_weights
        self.diagnostic_functions = list(diagnostic_functions or [])
        for fn in (*self.reward_functions, *self.diagnostic_functions):
            if isinstance(fn, str):  # a wrong import path is one error now, before any folder or model
                import_function(fn)
        self.generation = generation
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.missing_eos_penalty = missing_eos_penalty
        self.reward_clip = reward_clip
        self.normalize_rewards = normalize_rewards
        self.optim = as_dataclass(OptimSpec, optim)
        self.schedule_steps = schedule_steps
        self.forward_batch_size = forward_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.offload_frozen = offload_frozen
        self.seed = seed
        self.disable_dropout = disable_dropout
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.save_every_n_steps = save_every_n_steps

        self.kl_ctl = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if kl_target is not None
            else FixedKLController(kl_coef)
        )
        self.reward_moments = RunningMoments()
        self.rollout_step = 0  # completed rollout steps (prompt batches), checkpointed
        self.policy: nn.Module | None = None
        self.scorer = None
        self.diagnostic_scorer = None
        self._engine = None  # the vllm engine (generation.engine == "vllm"), built on first use
        self._policy_version = 0  # policy optimiser steps so far (when to sync the engine)
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self._schedulers: list = []
        self._nonfinite_rewards_at: int | None = None  # the rollout step whose rewards were NaN/inf (skipped)
        self.timings: dict[str, float] = {}
        self.last_samples: list[dict] = []
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._trainer is not None:
            reject_optimiser_step_options(self.trainer, type(self).__name__)

    # ----------------------------------------------------------------------------------- models

    @property
    def uses_reference(self) -> bool:
        """Whether the KL penalty (hence a reference model) is on."""
        return self.kl_coef > 0 or self.kl_target is not None

    @property
    def reference_is_adapter_off(self) -> bool:
        """The reference is the policy with its LoRA adapter disabled (no second copy)."""
        return self.uses_reference and self.reference_spec is None and self.policy_spec.lora is not None

    @property
    def reference(self) -> nn.Module | None:
        return self._frozen.get("reference")

    @property
    def reward_model(self) -> nn.Module | None:
        return self._frozen.get("reward")

    def configure_model(self) -> None:
        """Build the policy (trainable), the reference and the reward model (frozen), the scorers.

        Idempotent (Lightning may call it again, e.g. when resuming). Subclasses call ``super()``
        first and then build their own trainable modules.
        """
        if self.policy is None:
            # train mode (transformers loads in eval): Lightning keeps each module's mode, and gradient
            # checkpointing only acts in train mode; the rollout switches to eval mode itself
            self.policy = self.shard(self.no_dropout(load_causal_lm(self.policy_spec)).train())
        if self.uses_reference and not self.reference_is_adapter_off and "reference" not in self._frozen:
            spec = self.reference_spec or replace(self.policy_spec, lora=None, gradient_checkpointing=False)
            self.hold_frozen("reference", self.shard(self.no_dropout(load_causal_lm(spec, trainable=False))))
        if self.reward_spec is not None and "reward" not in self._frozen:
            self.hold_frozen("reward", self.shard(load_sequence_classifier(self.reward_spec, trainable=False)))
        if self.scorer is None:
            self.scorer = build_scorer(
                self.reward_model, self.reward_functions, self.reward_weights, self.forward_batch_size,
                padding_free=self.padding_free,
            )
        if self.diagnostic_functions and self.diagnostic_scorer is None:
            self.diagnostic_scorer = RewardFunctionScorer(self.diagnostic_functions)
        self.check_padding_free(policy=self.policy, reference=self.reference, reward_model=self.reward_model)

    def check_padding_free(self, **models: nn.Module | None) -> None:
        """With ``padding_free``, refuse (a ``ValueError`` naming the model and why) models whose
        attention implementation cannot take the packed rows' 4D mask."""
        if not self.padding_free:
            return
        for name, model in models.items():
            reason = None if model is None else four_d_mask_refusal(model)
            if reason is not None:
                raise ValueError(f"padding_free needs a 4D attention mask, but the {name}: {reason}")

    def exported_model(self) -> nn.Module:
        return self.policy

    def no_dropout(self, model: nn.Module) -> nn.Module:
        """``model`` with its dropout off when ``disable_dropout`` (the default), else as it is."""
        return disable_dropout(model) if self.disable_dropout else model

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The policy's trainable parameters (what the actor optimiser holds)."""
        return (p for p in self.policy.parameters() if p.requires_grad)

    # --------------------------------------------------------------------------------- rollout

    def score(self, rollout: Rollout, batch: dict) -> Scores:
        """Score each row with the reward sources, compute the diagnostics, and shape the scores."""
        idx = rollout.prompt_index.tolist()
        prompts = [batch["prompt"][i] for i in idx]
        extra = [batch["extra"][i] for i in idx] if "extra" in batch else [{} for _ in idx]
        completions = rollout.decode_responses(self.tokenizer)
        with self.frozen_on_device("reward"):
            raw, parts = self.scorer(rollout, prompts, completions, extra)
        diagnostics = {}
        if self.diagnostic_scorer is not None:
            _, diagnostics = self.diagnostic_scorer(rollout, prompts, completions, extra)
        raw = raw.float().to(self.device)
        self.check_scores(raw, parts)
        return Scores(
            rewards=self.shape_scores(raw, rollout.finished),
            raw=raw,
            parts=parts,
            diagnostics=diagnostics,
            prompts=prompts,
            completions=completions,
        )

    def check_scores(self, raw: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Non-finite scores (a reward model's NaN/inf; reward functions are refused NaN/inf by their
        scorer) on any rank: ``optim.nonfinite: stop`` raises naming the source, the rows and the
        rollout step; ``skip`` marks this rollout step so that none of its optimiser steps is taken and
        the reward normaliser does not take them in. Every rank calls it (an all-reduce)."""
        bad = ~torch.isfinite(raw)
        what = None
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            sources = [k for k, v in parts.items() if not bool(torch.isfinite(v.to(bad.device)[bad]).all())]
            what = (
                f"rewards ({', '.join(sources) or 'the weighted sum'}: {raw[bad][0].item()} at rows "
                f"{rows[:8]}{' ...' if len(rows) > 8 else ''} of {len(raw)})"
            )
        if self.nonfinite_step(what, f"rollout step {self.rollout_step + 1}"):
            self._nonfinite_rewards_at = self.rollout_step

    def shape_scores(self, raw: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Missing-EOS penalty, then running normalisation, then clipping: ``(N,)`` -> ``(N,)``."""
        r = raw.clone()
        if self.missing_eos_penalty is not None:
            r = r - self.missing_eos_penalty * (~finished.to(r.device)).float()
        if self.normalize_rewards and self._nonfinite_rewards_at != self.rollout_step:  # NaN would stick
            self.reward_moments.update(self._gather(r))
            r = (r - self.reward_moments.mean) / (self.reward_moments.std + 1e-8)
        if self.reward_clip is not None:
            r = r.clamp(-self.reward_clip, self.reward_clip)
        return r

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` from every rank, flattened (``x`` itself on one process)."""
        world = self.trainer.world_size if (self._trainer is not None or self._fabric is not None) else 1
        return self.all_gather(x).flatten() if world > 1 else x

    def _chunked(self, fn: Callable[[Rollout], torch.Tensor | tuple], rollout: Rollout):
        """``fn`` over chunks of ``forward_batch_size`` rows (``rows_per_forward``), outputs (a tensor or
        a tuple) concatenated.

        Several processes with different row counts or widths: the ranks agree on the most chunks, and
        a rank with fewer runs (and drops) forwards of its row 0, so every rank runs the same forwards
        (each one a collective under FSDP2)."""
        step = self.rows_per_forward(self.forward_batch_size, rollout)
        outs = [fn(rollout.select(slice(i, i + step))) for i in range(0, len(rollout), step)]
        if world_size() > 1:
            most = int(all_reduce(torch.tensor(len(outs), device=self.device), "max"))
            for _ in range(most - len(outs)):
                fn(rollout.select(slice(0, 1)))
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return torch.cat(outs)

    def response_logprobs(
        self, model: nn.Module, rollout: Rollout, return_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rollout.response_logprobs`` under ``model`` at the sampling temperature, with this module's
        ``padding_free`` and ``share_prompt``: the one place the training-side forwards are set up."""
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return rollout.response_logprobs(
            model, self.generation.temperature, return_entropy=return_entropy, padding_free=self.padding_free,
            share_prompt=self.share_prompt, pad_token_id=0 if pad is None else pad,
        )  # fmt: skip

    @torch.no_grad()
    def policy_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``(N, R)`` fp32 log-probs of the responses under the current policy (eval mode, no grad)."""
        with eval_mode(self.policy):
            return self._chunked(lambda r: self.response_logprobs(self.policy, r)[0], rollout)

    recompute_logprobs: bool = True
    """Recompute the rollout policy's log-probs with a no-grad forward (set by PPO and GRPO)."""

    def rollout_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``(N, R)`` log-probs of the rollout policy, the ratio's denominator, 0 off the mask: recomputed
        (``policy_logprobs``) with ``recompute_logprobs`` or a sampler whose log-probs are not the
        trainer's (the vLLM engine, a ``generation.dtype`` copy: theirs only enter through TIS), else
        those recorded while sampling. The one place this is decided."""
        if self.recompute_logprobs or not self.sampler_logprobs_are_trainers():
            return self.policy_logprobs(rollout)
        return rollout.logprobs.masked_fill(rollout.response_mask == 0, 0.0)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """``(N, R)`` fp32 log-probs under the frozen reference (None when the KL penalty is off)."""
        if not self.uses_reference:
            return None
        if self.reference_is_adapter_off:
            with eval_mode(self.policy), self.policy.disable_adapter():
                return self._chunked(lambda r: self.response_logprobs(self.policy, r)[0], rollout)
        with self.frozen_on_device("reference") as ref:
            return self._chunked(lambda r: self.response_logprobs(ref, r)[0], rollout)

    def kl_shaped_rewards(
        self,
        scores: torch.Tensor,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards: ``-kl_coef * kl_t`` on every response token, plus the sequence score on
        the last one (Ziegler et al. 2019; InstructGPT).

        Args:
            scores: ``(N,)`` shaped sequence scores.
            logprobs: ``(N, R)`` old policy log-probs; ``ref_logprobs``: ``(N, R)`` or None (no KL).
            mask: ``(N, R)`` response mask.

        Returns:
            ``(rewards (N, R), kl (N, R))``, both 0 off the mask.
        """
        if ref_logprobs is None:
            kl = torch.zeros_like(logprobs)
        else:
            kl = kl_penalty(logprobs, ref_logprobs, kind=self.kl_estimator, mask=mask)  # (N, R)
        return token_rewards(scores, kl, mask, self.kl_ctl.value), kl

    def update_kl_controller(self, kl: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed the adaptive controller the mean per-sequence KL of this rollout's rows on every rank
        (rows with an all-0 ``mask`` do not count; ranks may hold different row counts)."""
        rows = mask.sum(-1) > 0
        total = all_reduce(torch.stack([(kl * mask).sum(), rows.sum().to(kl.dtype)]).float())
        if total[1] > 0:
            self.kl_ctl.update(float(total[0] / total[1]), n_steps=int(total[1]))
