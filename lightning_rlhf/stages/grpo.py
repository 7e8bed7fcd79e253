"""Critic-free online RL from groups of samples: GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's tricks.

One ``training_step`` = one batch of prompts, in the order of the papers' pseudocode::

    rollout, scores = self.sample_groups(batch)          # G samples per prompt, scored (DAPO: refilled)
    ref_logprobs = self.reference_logprobs(rollout)      # only with beta > 0
    old_logprobs = self.old_logprobs(rollout)            # only when the policy moves before a row is used
    rewards = self.sequence_rewards(scores, kl)          # minus beta * KL with kl_in_reward
    advantages = self.advantages(rewards)                # the registered estimator, flat groups -> 0
    exp = Experience(rollout, old_logprobs, ref_logprobs, advantages=advantages, ...)
    self.optimise(exp)                                   # iterations x mini-batches
    self.log_rollout(...)

Rollout, scoring, reference and logging are :class:`~lightning_rlhf.stages.online.OnlineRLModule`'s;
this file only holds what differs from PPO: no critic, sequence-level group advantages, a KL term in
the loss instead of the reward, and dynamic sampling.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from ..core import (
    aggregate_loss,
    flat_groups,
    group_centred,
    kl_penalty,
    masked_mean,
    masked_moments,
    registry,
)
from ..models import ModelSpec
from ..models.distributed import all_reduce
from ..rollout import Rollout
from ..rollout.experience import Experience
from ..rollout.scoring import Scores
from .common import as_dataclass
from .online import GenerationSpec, OnlineRLModule


class GRPOModule(OnlineRLModule):
    """Group-relative policy optimisation and its relatives; no critic.

    Each prompt is sampled ``num_generations`` times; each response's sequence reward is compared
    with the others of its group (:func:`~lightning_rlhf.core.group_advantages`) and the advantage is
    spread over its tokens in the clipped surrogate of :func:`~lightning_rlhf.core.ppo_policy_loss`.

    Recipes (options of this class):

    - GRPO (Shao et al. 2024, DeepSeekMath): ``advantage_estimator: grpo``, ``scale_by_std: true``,
      ``loss_agg: seq_mean_token_mean``, ``beta: 0.04`` (k3 KL in the loss).
    - Dr. GRPO (Liu et al. 2025): ``scale_by_std: false``, ``loss_agg: seq_mean_token_sum``, ``beta: 0``.
    - RLOO (Ahmadian et al. 2024): ``advantage_estimator: rloo``, ``kl_in_reward: true`` (or ``beta: 0``).
    - REINFORCE++-baseline (Hu 2025): ``advantage_estimator: reinforce_pp``.
    - DAPO (Yu et al. 2025): ``clip_eps_high: 0.28``, ``loss_agg: token_mean``,
      ``dynamic_sampling: true``, ``beta: 0``.

    Old log-probs: with ``num_iterations: 1`` and one optimiser step per rollout (``mini_batch_size``
    unset or >= the rollout's rows) the rollout policy *is* the current one, so the ratio's
    denominator is ``logprobs.detach()`` of the training forward itself: no extra forward. Otherwise
    the policy has moved before some rows are used, and the old log-probs are computed once per
    rollout (``recompute_logprobs``) or taken from sampling.

    Zero-signal groups: a group whose scores are all equal (``rollout/zero_std_frac``) gets
    advantage exactly 0 (the estimators' ``r - mean`` can be a rounding error, which ``/ (std + eps)``
    would blow up), so it contributes no policy gradient.

    Dynamic sampling (DAPO): groups with all-equal scores are dropped, and the *same* prompt batch is
    sampled again (fresh groups for every prompt), keeping groups with signal, until the batch holds
    as many groups as it has prompts, or ``max_resample_rounds`` extra rounds were spent. The step
    then trains on the groups it has (possibly fewer, possibly two groups of one prompt); with none
    at all it skips the update. Logged: ``rollout/sampling_rounds``, ``rollout/groups``.

    Args:
        policy: the policy (see ``OnlineRLModule``).
        num_generations: samples per prompt (the group size G); sets ``generation.num_samples``.
        advantage_estimator: a name in ``core.registry``: ``grpo`` (``(r - mean) / std``), ``rloo``
            (leave-one-out baseline), ``reinforce_pp`` (group baseline, then batch whitening), one
            registered with ``register_advantage_estimator``, or an import path
            ``pkg.module.function``. Flat groups get advantage 0 whatever the estimator.
        scale_by_std: divide GRPO advantages by the group std; False is Dr. GRPO.
        num_iterations: optimisation passes over each rollout (GRPO's mu).
        mini_batch_size: rollout rows per optimiser step (None: the whole rollout, one step per
            iteration).
        micro_batch_size: rows per forward/backward; gradients are accumulated over the mini-batch
            (None: as many rows as fit in ``micro_batch_tokens`` padded tokens, the whole mini-batch
            when that is None).
        clip_eps: lower (and, by default, upper) ratio clip range.
        clip_eps_high: upper clip range (DAPO's clip-higher, e.g. 0.28); None: ``clip_eps``.
        dual_clip: dual-clip bound ``c > 1`` for negative advantages (None: off).
        policy_loss: the policy loss by name in ``core.registry`` (``ppo_clip``: ``core.ppo_policy_loss``;
            or one registered with ``register_policy_loss``, or an import path).
        loss_agg: ``seq_mean_token_mean`` (GRPO), ``token_mean`` (DAPO) or ``seq_mean_token_sum``
            (Dr. GRPO, normalised by ``generation.max_new_tokens``).
        beta: KL coefficient to the reference (the initial one with ``kl_target``). 0: no KL and no
            reference model is loaded at all.
        kl_in_reward: subtract ``beta * sum_t KL_t`` (on the sampling policy's log-probs;
            the trainer's forward with the vllm engine or ``generation.dtype``)
            from each sequence reward before the group advantages, instead of adding
            ``beta * KL`` to the loss.
        kl_estimator: per-token KL estimator; ``k3`` as in GRPO (unbiased, non-negative).
        entropy_coef: weight of an entropy bonus in the loss (0: off; entropy is logged either way).
        recompute_logprobs: when old log-probs are needed (see above), recompute them with a no-grad
            forward after sampling (True) or use those recorded while sampling (False; ignored with
            ``generation.engine: vllm``, whose log-probs are never the ratio's denominator: they
            only enter through TIS, ``tis_cap``).
        dynamic_sampling: drop zero-variance groups and refill the batch (DAPO; see above).
        max_resample_rounds: most extra sampling rounds per step with ``dynamic_sampling``.
        generation: sampling settings of the rollout; its ``num_samples`` is ``num_generations``.
        **kwargs: the options of ``OnlineRLModule`` (reward model / functions and weights,
            diagnostic functions, reference, generation, ``kl_target``, reward shaping, ``optim``,
            logging, export). Use ``beta``, not ``kl_coef``.
    """

    def __init__(
        self,
        policy: ModelSpec | str,
        num_generations: int = 8,
        advantage_estimator: str = "grpo",
        scale_by_std: bool = True,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        policy_loss: str = "ppo_clip",
        loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean",
        beta: float = 0.04,
        kl_in_reward: bool = False,
        kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k3",
        entropy_coef: float = 0.0,
        recompute_logprobs: bool = True,
        dynamic_sampling: bool = False,
        max_resample_rounds: int = 3,
        generation: GenerationSpec | None = None,
        **kwargs,
    ):
        if "kl_coef" in kwargs:
            raise ValueError("GRPOModule: set the KL coefficient with `beta`, not `kl_coef`")
        if num_generations < 1 or num_iterations < 1 or max_resample_rounds < 0:
            raise ValueError(
                f"GRPOModule: num_generations ({num_generations}) and num_iterations ({num_iterations}) must be "
                f">= 1, max_resample_rounds ({max_resample_rounds}) >= 0"
            )
        estimator = registry.advantage_estimator(advantage_estimator, "GRPOModule")
        registry.policy_loss(policy_loss, "GRPOModule")
        if num_generations < estimator.min_group_size:
            raise ValueError(
                f"GRPOModule: advantage_estimator={advantage_estimator!r} needs num_generations >= "
                f"{estimator.min_group_size}"
            )
        generation = as_dataclass(GenerationSpec, generation)
        if generation.num_samples not in (1, num_generations):
            raise ValueError(
                f"GRPOModule: generation.num_samples={generation.num_samples} contradicts "
                f"num_generations={num_generations}; set only num_generations"
            )
        generation = replace(generation, num_samples=num_generations)
        super().__init__(policy, generation=generation, kl_coef=beta, kl_estimator=kl_estimator, **kwargs)
        # The base recorded its own `kl_coef` (= beta) among the hparams; GRPO's constructor takes `beta`
        # only, so load_from_checkpoint would fail on it.
        self._hparams.pop("kl_coef", None)
        self._hparams_initial.pop("kl_coef", None)
        self.num_generations = num_generations
        self.advantage_estimator = advantage_estimator
        self.scale_by_std = scale_by_std
        self.num_iterations = num_iterations
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss = policy_loss
        self.loss_agg = loss_agg
        self.beta = beta
        self.kl_in_reward = kl_in_reward
        self.entropy_coef = entropy_coef
        self.recompute_logprobs = recompute_logprobs
        self.dynamic_sampling = dynamic_sampling
        self.max_resample_rounds = max_resample_rounds

    # ------------------------------------------------------------------------------ one step

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollout, scores, stats = self.sample_groups(batch)
        if stats.get("rollout/groups_all_ranks") == 0:  # dynamic sampling found no group with signal: skip
            stats["train/skipped"] = 1.0  # the LR schedule advances per update: not here
            self.rollout_step += 1
            self.log_rollout(rollout, scores, None, stats)
            return
        # another rank has groups, this one none: it runs the same forwards/steps with zero weight
        has_rows = stats.get("rollout/groups") != 0
        mask = rollout.response_mask
        with self.timed("forward"):
            ref_logprobs = self.reference_logprobs(rollout)  # None when beta == 0
            old_logprobs = self.old_logprobs(rollout)  # None: logprobs.detach() of the training forward
            behaviour = self.behaviour_logprobs(rollout, old_logprobs, ref_logprobs)
        kl = None if ref_logprobs is None else kl_penalty(behaviour, ref_logprobs, self.kl_estimator, mask)
        rewards = self.sequence_rewards(scores.rewards, kl, mask)
        advantages = self.advantages(rewards, has_rows)
        exp = Experience(rollout, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rewards=rewards, kl=kl,
                         advantages=advantages)  # fmt: skip
        with self.timed("train"):
            stats.update(self.optimise(exp) if has_rows else self.optimise(exp, has_rows=False))
        stats["rollout/advantage_abs_mean"] = float(advantages.abs().mean())
        self.rollout_step += 1
        self.log_rollout(rollout, scores, kl, stats)
        if kl is not None and self.kl_target is not None:
            self.update_kl_controller(kl, mask if has_rows else torch.zeros_like(mask))

    # ------------------------------------------------------------------------------- sampling

    def sample_groups(self, batch: dict) -> tuple[Rollout, Scores, dict[str, float]]:
        """Sample and score G responses per prompt; with ``dynamic_sampling``, keep only groups with
        signal and resample the batch until it is full (see the class docstring).

        Returns ``(rollout, scores, stats)``. When dynamic sampling kept no group at all, the first
        round's rollout and scores (for the logs) with ``stats["rollout/groups"] == 0``.

        Several processes: the ranks agree on the rounds (they resample while any rank's batch is
        not full, a rank already full sampling and dropping), so every rank runs the same
        forwards; ``stats["rollout/groups_all_ranks"]`` is the groups kept over all ranks (0: every
        rank skips the update).
        """
        n_prompts = batch["input_ids"].shape[0]
        kept: list[tuple[Rollout, Scores]] = []
        n_kept, rounds, first = 0, 0, None
        stats: dict[str, float] = {}
        while True:
            with self.timed("generate"):
                rollout = self.generate(batch)
            with self.timed("score"):
                scores = self.score(rollout, batch)
            rounds += 1
            flat = flat_groups(scores.rewards, self.num_generations)  # (n_prompts,) no signal
            if first is None:
                first = (rollout, scores)
                stats["rollout/zero_std_frac"] = float(flat.float().mean())
            if not self.dynamic_sampling:
                return rollout, scores, stats
            groups = (~flat).nonzero().flatten()[: n_prompts - n_kept]
            if len(groups):
                rows = groups[:, None] * self.num_generations + torch.arange(
                    self.num_generations, device=groups.device
                )
                rows = rows.flatten()
                kept.append((rollout.select(rows), scores.select(rows)))
                n_kept += len(groups)
            # agreed: stop when every rank's batch is full (or the rounds are spent everywhere)
            need = all_reduce(torch.tensor(int(n_kept < n_prompts), device=self.device), "max")
            if not bool(need) or rounds > self.max_resample_rounds:
                break
        stats["rollout/sampling_rounds"] = float(rounds)
        stats["rollout/groups"] = float(n_kept)
        stats["rollout/groups_all_ranks"] = float(all_reduce(torch.tensor(n_kept, device=self.device)))
        if not kept:
            return (*first, stats)
        rollout = Rollout.cat([r for r, _ in kept], self.tokenizer.pad_token_id)
        return rollout, Scores.cat([s for _, s in kept]), stats

    def old_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """``(N, R)`` log-probs of the rollout policy, or None when the training forward's own
        (detached) log-probs are exactly those: one iteration, one optimiser step."""
        # agreed over ranks (their row counts may differ): the choice decides whether a forward runs
        rows = int(all_reduce(torch.tensor(len(rollout), device=self.device), "max"))
        one_step = self.mini_batch_size is None or self.mini_batch_size >= rows
        if self.num_iterations == 1 and one_step:
            return None
        return self.rollout_logprobs(rollout)

    def behaviour_logprobs(
        self, rollout: Rollout, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None
    ) -> torch.Tensor:
        """``(N, R)`` log-probs of the sampling policy that the rollout's per-token KL is taken from.

        Those recorded while sampling (no extra forward), unless they are not the trainer's (the vllm
        engine or a ``generation.dtype`` copy: other kernels and precision, vllm's weights possibly
        ``sync_every`` steps old) and the KL steers training (``kl_in_reward`` or ``kl_target``): then
        the trainer's (``old_logprobs``, or one no-grad forward). Otherwise the sampler's log-probs only
        enter the logged ``rollout/kl``."""
        steers = ref_logprobs is not None and (self.kl_in_reward or self.kl_target is not None)
        if not steers or self.sampler_logprobs_are_trainers():
            return rollout.logprobs
        return self.rollout_logprobs(rollout) if old_logprobs is None else old_logprobs

    # ----------------------------------------------------------------------------- advantages

    def sequence_rewards(
        self, scores: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        """``(N,)`` rewards of the group estimator: the shaped scores, minus ``beta * sum_t KL_t`` with
        ``kl_in_reward``."""
        if not self.kl_in_reward or kl is None:
            return scores
        return scores - self.kl_ctl.value * (kl * mask).sum(-1)

    def advantages(self, rewards: torch.Tensor, has_rows: bool = True) -> torch.Tensor:
        """``(N,)`` group advantages of the registered ``advantage_estimator``; exactly 0 for groups
        whose rewards are all equal (whatever the estimator). The built-in ``reinforce_pp`` whitens with
        the statistics of every rank's rows (``has_rows=False``: this rank's rows are not trained on and
        do not count), so that 2 ranks x B rows train as 1 x 2B."""
        estimate = registry.advantage_estimator(self.advantage_estimator, "GRPOModule").fn
        kw = {}
        if self.advantage_estimator == "reinforce_pp":  # a collective: every rank calls advantages()
            local = masked_moments(group_centred(rewards, self.num_generations), torch.ones_like(rewards))
            kw["moments"] = all_reduce(local if has_rows else torch.zeros_like(local))
        adv = estimate(rewards, self.num_generations, scale_by_std=self.scale_by_std, **kw)
        if not isinstance(adv, torch.Tensor) or adv.shape != rewards.shape:
            raise ValueError(
                f"GRPOModule: advantage_estimator {self.advantage_estimator!r} returned "
                f"{tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__}, expected a "
                f"tensor of shape {tuple(rewards.shape)}"
            )
        flat = flat_groups(rewards, self.num_generations).repeat_interleave(self.num_generations)  # (N,)
        return adv.detach().float().masked_fill(flat, 0.0)

    # --------------------------------------------------------------------------- optimisation

    def grpo_loss(self, mb: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped surrogate + ``beta`` x KL to the reference - ``entropy_coef`` x entropy, on one
        micro-batch (its ``(n, R)`` ``old_logprobs`` / ``ref_logprobs``, ``(n,)`` ``advantages``).

        ``mb.old_logprobs`` None: the ratio's denominator is ``logprobs.detach()`` (ratio 1, gradient
        ``A * grad log pi``)."""
        logprobs, entropy = self.response_logprobs(self.policy, mb.rollout, return_entropy=True)
        mask = mb.response_mask
        ref_logprobs, advantages = mb.ref_logprobs, mb.advantages
        old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs
        tis, engine_stats = self.engine_correction(mb.rollout, old)  # engine-vs-trainer mismatch (TIS weights)
        max_len = self.generation.max_new_tokens  # constant normaliser of seq_mean_token_sum
        pg_loss, pg = registry.policy_loss(self.policy_loss, "GRPOModule").fn(
            logprobs,
            old,
            advantages,
            mask,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            agg=self.loss_agg,
            max_len=max_len,
            token_weights=tis,
        )
        loss = pg_loss
        stats = {
            **engine_stats,
            "train/policy_loss": pg_loss.detach(),
            **{f"train/{k}": pg[k] for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max") if k in pg},
        }
        if ref_logprobs is not None and not self.kl_in_reward:
            kl = kl_penalty(logprobs, ref_logprobs, self.kl_estimator, mask)  # (n, R), grad through logprobs
            kl_loss = aggregate_loss(kl, mask, self.loss_agg, max_len)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["train/kl_loss"] = kl_loss.detach()
        mean_entropy = masked_mean(entropy, mask)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * mean_entropy
        stats["train/entropy"] = mean_entropy.detach()
        stats["train/loss"] = loss.detach()
        return loss, stats

    def optimise(self, experience: Experience, has_rows: bool = True) -> dict[str, float]:
        """``num_iterations`` x shuffled mini-batches, one optimiser step each, accumulated over
        micro-batches (``OnlineRLModule.optimise_minibatches``); the LR schedule advances once per
        call. Returns the mean of each ``train/`` statistic over all micro-batches. ``has_rows``:
        False when this rank kept no group but another did (it runs zero-weight micro-batches)."""
        (opt,) = self.optimizer_list()
        stats, _ = self.optimise_minibatches(
            experience,
            self.grpo_loss,
            [(opt, self.optim.max_grad_norm)],
            epochs=self.num_iterations,
            mini_batch_size=self.mini_batch_size,
            micro_batch_size=self.micro_batch_size,
            loss_agg=self.loss_agg,
            has_rows=has_rows,
        )
        return stats
