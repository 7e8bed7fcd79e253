"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT), as one
LightningModule with manual optimisation. ``training_step`` reads like cleanrl's ``ppo.py``:

    rollout  -> score -> old log-probs, reference log-probs, values -> KL-shaped rewards
             -> GAE (whitened advantages) -> epochs x shuffled mini-batches of clipped PPO -> log
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from ..core import gae, masked_mean, masked_moments, masked_var, registry, value_loss, whiten
from ..models import ModelSpec, as_spec, load_sequence_classifier
from ..models.distributed import all_reduce
from ..models.loader import DTYPES
from ..models.value import ValueHead, hidden_size, logprobs_and_values, sequence_values
from ..rollout import Rollout, eval_mode
from ..rollout.experience import Experience
from .common import OptimSpec, as_dataclass, build_optimizer, build_scheduler
from .online import OnlineRLModule


class PPOModule(OnlineRLModule):
    """PPO with a policy and a critic (trained), a reference and a reward model (frozen).

    One ``training_step`` = one batch of prompts: sample, score, compute per-token KL-shaped rewards
    and GAE advantages, then ``ppo_epochs`` passes over shuffled mini-batches of ``mini_batch_size``
    rows, each one optimiser step of the actor and of the critic, accumulated over micro-batches of
    ``micro_batch_size`` rows. All options of the rollout, scoring and KL are those of
    :class:`~lightning_rlhf.stages.online.OnlineRLModule` (passed through ``**kwargs``).

    Critic: a backbone plus a scalar head. By default a copy of the reward model (InstructGPT), or of
    the policy (``critic_init: policy``, a fresh head; also the fallback without a reward model), or
    an explicit ``critic`` folder; with ``share_backbone`` only a value head on the policy's own last
    hidden state (least memory; the value loss, scaled by ``vf_coef``, then also trains the backbone).

    Under a ``Trainer`` / ``lightning-rlhf fit``: give ``RLHFDataModule`` prompt records. In a Fabric
    loop, call the same methods::

        fabric = L.Fabric(accelerator="auto", devices=1, precision="bf16-mixed")
        module = PPOModule(policy="outputs/sft", reward_model="outputs/reward", schedule_steps=100)
        with fabric.init_module():
            module.configure_model()
        optimizers, _schedulers = module.configure_optimizers()
        model, *optimizers = fabric.setup(module, *optimizers)   # the module finds them itself
        dm = RLHFDataModule("prompts.jsonl", kind="prompt", tokenizer="outputs/sft", batch_size=16)
        dm.setup("fit")
        for i, batch in enumerate(dm.train_dataloader()):
            model.training_step(fabric.to_device(batch), i)      # rollout + PPO update + fabric.log
        # checkpoint: fabric.save(path, {"model": model, "actor": optimizers[0], "critic": optimizers[1],
        #                               "online": module.online_state_dict()})
        module.save_pretrained("outputs/ppo")

    Args:
        policy: the policy (see ``OnlineRLModule``).
        critic: the critic's folder and loading options (a sequence-classifier head is added when the
            folder holds a causal LM). None: from ``critic_init``, with the policy's dtype, LoRA and
            gradient-checkpointing settings.
        critic_init: where the default critic comes from: ``reward_model`` (InstructGPT) or ``policy``.
        share_backbone: no separate critic: a value head on the policy's backbone.
        critic_optim: the critic's (or value head's) optimiser and schedule. Default: ``OptimSpec()``.
            Its ``nonfinite`` is not read: ``optim.nonfinite`` decides for the whole step (actor and
            critic are skipped together, or the run stops).
        ppo_epochs: passes over the rollout per step.
        mini_batch_size: rollout rows per optimiser step (None: the whole rollout, one step per epoch).
        micro_batch_size: rows per forward/backward; gradients are accumulated over the mini-batch
            (None: as many rows as fit in ``micro_batch_tokens`` padded tokens, the whole mini-batch
            when that is None).
        clip_eps: PPO ratio clip range.
        policy_loss: the policy loss by name in ``core.registry`` (``ppo_clip``: ``core.ppo_policy_loss``;
            or one registered with ``register_policy_loss``, or an import path). ``target_kl`` reads
            its ``approx_kl`` statistic.
        value_clip_eps: clip range of the value update around the rollout's values (None: unclipped).
        vf_coef: weight of the value loss (matters with ``share_backbone``; with a separate critic it
            only scales the critic's gradients before clipping).
        entropy_coef: weight of an entropy bonus (0: off; entropy is logged either way).
        gamma: discount of GAE.
        lam: GAE lambda.
        whiten_advantages: normalise advantages over the rollout's response tokens (zero mean, unit
            variance), of every rank together under several processes.
        loss_agg: reduction of the per-token losses: ``token_mean``, ``seq_mean_token_mean`` or
            ``seq_mean_token_sum`` (see ``core.losses``).
        target_kl: stop the epochs of a step early once the mean ``approx_kl`` of an epoch exceeds it
            (cleanrl's ``target_kl``; None: off).
        recompute_logprobs: recompute the old log-probs with a training-style forward after
            generation (exact ratio 1 at the first mini-batch, whatever the KV-cache numerics);
            False: use the log-probs recorded while sampling (``hf`` engine only).
        **kwargs: the options of ``OnlineRLModule`` (reward model/functions, reference, generation,
            KL, reward shaping, ``optim`` for the actor, logging, export).
    """

    def __init__(
        self,
        policy: ModelSpec | str,
        critic: ModelSpec | str | None = None,
        critic_init: Literal["reward_model", "policy"] = "reward_model",
        share_backbone: bool = False,
        critic_optim: OptimSpec | None = None,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        clip_eps: float = 0.2,
        policy_loss: str = "ppo_clip",
        value_clip_eps: float | None = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean",
        target_kl: float | None = None,
        recompute_logprobs: bool = True,
        **kwargs,
    ):
        if kwargs.get("share_prompt"):
            raise ValueError(
                "PPOModule: share_prompt is for GRPO/RLOO's groups of samples per prompt; PPO's critic and "
                "value forwards score the separate rows, so set share_prompt: false"
            )
        super().__init__(policy, **kwargs)
        if not recompute_logprobs and (self.generation.engine != "hf" or self.generation.dtype != "auto"):
            what = (f"generation.engine={self.generation.engine!r}" if self.generation.engine != "hf"
                    else f"generation.dtype={self.generation.dtype!r}")  # fmt: skip
            raise ValueError(
                "PPOModule: recompute_logprobs=False takes the old log-probs from the sampler, but with "
                f"{what} they are the sampler's, not the trainer's; keep "
                "recompute_logprobs=True (and use tis_cap to correct the mismatch)"
            )
        for name, size in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {size}")
        if share_backbone and critic is not None:
            raise ValueError("share_backbone uses the policy's backbone: do not also give a `critic`")
        registry.policy_loss(policy_loss, "PPOModule")
        self.critic_spec = as_spec(critic) if critic is not None else None
        self.critic_init = critic_init
        self.share_backbone = share_backbone
        self.critic_optim = as_dataclass(OptimSpec, critic_optim)
        self.ppo_epochs = ppo_epochs
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.clip_eps = clip_eps
        self.policy_loss = policy_loss
        self.value_clip_eps = value_clip_eps
        self.vf_coef = vf_coef
        self.entropy_coef = entropy_coef
        self.gamma = gamma
        self.lam = lam
        self.whiten_advantages = whiten_advantages
        self.loss_agg = loss_agg
        self.target_kl = target_kl
        self.recompute_logprobs = recompute_logprobs
        self.critic: nn.Module | None = None
        self.value_head: ValueHead | None = None

    # ----------------------------------------------------------------------------------- models

    def critic_model_spec(self) -> ModelSpec:
        """The critic's spec: ``critic`` if given, else the reward model's (or policy's) folder with
        the policy's training settings."""
        if self.critic_spec is not None:
            return self.critic_spec
        source = (
            self.reward_spec
            if (self.critic_init == "reward_model" and self.reward_spec)
            else self.policy_spec
        )
        p = self.policy_spec
        return replace(
            source,
            dtype=p.dtype,
            lora=p.lora,
            quantization=p.quantization,
            gradient_checkpointing=p.gradient_checkpointing,
        )

    def configure_model(self) -> None:
        super().configure_model()
        if self.share_backbone:
            if self.value_head is None:
                self.value_head = ValueHead(hidden_size(self.policy), dtype=DTYPES[self.policy_spec.dtype])
        elif self.critic is None:
            self.critic = self.shard(self.no_dropout(load_sequence_classifier(self.critic_model_spec())).train())
        self.check_padding_free(critic=self.critic)

    def critic_parameters(self):
        module = self.value_head if self.share_backbone else self.critic
        return (p for p in module.parameters() if p.requires_grad)

    def configure_optimizers(self):
        actor_opt, actor_sched = self.build_actor_optimizer()
        critic_opt = build_optimizer(self.critic_parameters(), self.critic_optim, fused=self._fused_adamw_ok())
        critic_sched = build_scheduler(critic_opt, self.critic_optim, self.total_rollout_steps())
        self._schedulers = [actor_sched, critic_sched]
        return [actor_opt, critic_opt], [actor_sched, critic_sched]

    def optimizer_names(self) -> list[str]:
        return ["actor", "critic"]

    # ------------------------------------------------------------------------------ one step

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with self.timed("generate"):
            rollout = self.generate(batch)
        with self.timed("score"):
            scores = self.score(rollout, batch)
        with self.timed("forward"):
            logprobs, values = self.old_logprobs_and_values(rollout)
            ref_logprobs = self.reference_logprobs(rollout)
        mask = rollout.response_mask
        rewards, kl = self.kl_shaped_rewards(scores.rewards, logprobs, ref_logprobs, mask)
        exp = Experience(rollout, old_logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards, kl=kl)
        exp.advantages, exp.returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:  # with every rank's mean and variance: 2 x B rows train as 1 x 2B
            exp.advantages = whiten(exp.advantages, mask, moments=all_reduce(masked_moments(exp.advantages, mask)))
        with self.timed("train"):
            stats = self.optimise(exp)
        stats.update(self.value_metrics(values, exp.returns, mask))
        self.rollout_step += 1
        self.log_rollout(rollout, scores, kl, stats)
        self.update_kl_controller(kl, mask)

    @torch.no_grad()
    def old_logprobs_and_values(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, R)`` old log-probs (recomputed or as sampled) and critic values, 0 off the mask."""
        mask = rollout.response_mask
        if self.share_backbone:  # one forward of the policy gives both (its log-probs are recomputed)
            with eval_mode(self.policy):
                logprobs, _, values = self._chunked(self.actor_critic_forward, rollout)
            if not self.recompute_logprobs:
                logprobs = self.rollout_logprobs(rollout)  # as sampled
        else:
            logprobs = self.rollout_logprobs(rollout)
            with eval_mode(self.critic):
                values = self._chunked(self.critic_values, rollout)
        return logprobs.masked_fill(mask == 0, 0.0), values.masked_fill(mask == 0, 0.0)

    def critic_values(self, mb: Rollout) -> torch.Tensor:
        """``(n, R)`` fp32 values of the separate critic for each response token's state."""
        return sequence_values(
            self.critic, *mb.sequences(), values_to_keep=mb.response_ids.shape[1], padding_free=self.padding_free
        )

    def actor_critic_forward(self, mb: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: ``(logprobs, entropy, values)``, each ``(n, R)`` fp32, with gradients."""
        t = self.generation.temperature
        if self.share_backbone:
            return logprobs_and_values(
                self.policy, self.value_head, *mb.sequences(), temperature=t, return_entropy=True,
                logits_to_keep=mb.response_ids.shape[1], padding_free=self.padding_free,
            )  # fmt: skip
        logprobs, entropy = mb.response_logprobs(self.policy, t, return_entropy=True, padding_free=self.padding_free)
        return logprobs, entropy, self.critic_values(mb)

    def ppo_loss(self, mb: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` x clipped value loss - ``entropy_coef`` x entropy on one
        micro-batch (its ``old_logprobs``, ``values``, ``advantages``, ``returns``: ``(n, R)``)."""
        logprobs, entropy, values = self.actor_critic_forward(mb.rollout)
        mask = mb.response_mask
        old_logprobs, old_values, advantages, returns = mb.old_logprobs, mb.values, mb.advantages, mb.returns
        tis, engine_stats = self.engine_correction(mb.rollout, old_logprobs)  # engine-vs-trainer mismatch
        max_len = self.generation.max_new_tokens  # constant normaliser for seq_mean_token_sum
        pg_loss, pg = registry.policy_loss(self.policy_loss, "PPOModule").fn(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_eps=self.clip_eps,
            clip_eps_high=None,
            dual_clip=None,
            agg=self.loss_agg,
            max_len=max_len,
            token_weights=tis,
        )
        vf_loss, vf = value_loss(
            values,
            old_values,
            returns,
            mask,
            clip_eps=self.value_clip_eps,
            agg=self.loss_agg,
            max_len=max_len,
        )
        mean_entropy = masked_mean(entropy, mask)
        loss = pg_loss + self.vf_coef * vf_loss - self.entropy_coef * mean_entropy
        stats = {
            **engine_stats,
            "train/loss": loss.detach(),
            "train/policy_loss": pg_loss.detach(),
            "train/value_loss": vf_loss.detach(),
            "train/entropy": mean_entropy.detach(),
            **{f"train/{k}": pg[k] for k in ("clipfrac", "approx_kl", "ratio_mean") if k in pg},
            "train/value_clipfrac": vf["clipfrac"],
        }
        return loss, stats

    def optimise(self, experience: Experience) -> dict[str, float]:
        """``ppo_epochs`` x shuffled mini-batches; one actor and one critic step per mini-batch
        (``OnlineRLModule.optimise_minibatches``).

        Returns the mean of each ``train/`` statistic over all micro-batches, plus ``train/epochs``.
        """
        actor_opt, critic_opt = self.optimizer_list()
        out, epochs_done = self.optimise_minibatches(
            experience,
            self.ppo_loss,
            [(actor_opt, self.optim.max_grad_norm), (critic_opt, self.critic_optim.max_grad_norm)],
            epochs=self.ppo_epochs,
            mini_batch_size=self.mini_batch_size,
            micro_batch_size=self.micro_batch_size,
            loss_agg=self.loss_agg,
            target_kl=self.target_kl,
        )
        out["train/epochs"] = float(epochs_done)
        return out

    @staticmethod
    def value_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """``explained_variance = 1 - Var[R - V] / Var[R]`` of the rollout's values (as cleanrl)."""
        var_returns = masked_var(returns, mask)
        ev = (
            1.0 - masked_var(returns - values, mask) / var_returns
            if var_returns > 0
            else torch.tensor(float("nan"), device=values.device)
        )
        return {
            "train/explained_variance": float(ev),
            "rollout/value_mean": float(masked_mean(values, mask)),
            "rollout/return_mean": float(masked_mean(returns, mask)),
        }
