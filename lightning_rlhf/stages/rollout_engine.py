"""The rollout side of the online stages: the rollout's own random generator, sampling with the
``hf`` sampler (from the policy, or from its low-precision copy with ``generation.dtype``: updated
in place after each optimiser step) or the colocated vLLM engine (built on first use, synced with the
policy every ``sync_every`` optimiser steps, closed at teardown), and the engine-vs-trainer correction (TIS).

:class:`RolloutEngine` is a mixin of :class:`~lightning_rlhf.stages.online.OnlineRLModule`: it reads
the module's ``policy``, ``tokenizer``, ``generation``, ``seed``, ``tis_cap`` and ``_policy_version``,
and keeps ``_engine``, ``_sampler_copy``, ``_generator`` and ``_pending_generator_state``.
"""

from __future__ import annotations

import contextlib

import torch

from ..core import truncated_importance_weights
from ..models.distributed import gathered_once, world_size
from ..rollout import Rollout
from ..rollout import generate as sample_rollout
from ..rollout.sampler_copy import DTYPES, SamplerCopy


class RolloutEngine:
    """Sampling (``generate``), its generator and the vLLM engine's lifecycle (a mixin)."""

    @property
    def generator(self) -> torch.Generator:
        """The rollout's own random generator, on ``self.device``, seeded ``seed + global_rank``."""
        if self._generator is None or self._generator.device != self.device:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed + self.global_rank)
            if self._pending_generator_state is not None:
                g.set_state(self._pending_generator_state)
                self._pending_generator_state = None
            elif self._generator is not None:  # device changed: carry the state over when possible
                with contextlib.suppress(RuntimeError):
                    g.set_state(self._generator.get_state())
            self._generator = g
        return self._generator

    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        config_eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        if isinstance(config_eos, int):
            ids.add(config_eos)
        elif config_eos:
            ids.update(config_eos)
        return sorted(i for i in ids if i is not None)

    rollout_gathered_once: bool = True
    """Under FSDP2, all-gather the policy's layers once per rollout (at the first forward) and keep
    them until sampling ends, instead of re-gathering every layer for every generated token: faster,
    at the cost of one full copy of the policy per rank during sampling. False: per-token gathers."""

    def generate(self, batch: dict) -> Rollout:
        """Sample responses to the prompt batch from the policy with ``generation.engine``: ``hf``
        (our sampler: eval mode, KV cache, no grad) or ``vllm`` (the colocated engine, synced first
        when the policy moved ``sync_every`` optimiser steps since its last sync)."""
        g = self.generation
        kwargs = dict(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            num_samples=g.num_samples,
            eos_token_id=self.eos_token_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            generator=self.generator,
        )
        if g.engine == "hf":
            model = self.sampling_model()
            with gathered_once(self.policy, self.rollout_gathered_once):  # FSDP2: gather once per rollout
                return sample_rollout(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    sync_stop=world_size() > 1,
                    cache_implementation=g.cache_implementation,
                    cuda_graphs=g.cuda_graphs,
                    torch_compile=g.torch_compile,
                    decode_attention=g.decode_attention,
                    **kwargs,
                )
        engine = self.rollout_engine()
        self.sync_engine()
        return engine.generate(batch["input_ids"], batch["attention_mask"], **kwargs)

    _sampler_copy: SamplerCopy | None = None
    _sampler_version: int | None = None

    def sampler_dtype(self) -> torch.dtype | None:
        """The dtype of the ``hf`` sampler's copy of the policy (``generation.dtype``); None: the
        sampler uses the policy itself (``auto``, the vllm engine, or a policy already in that dtype)."""
        name = self.generation.dtype
        if self.generation.engine != "hf" or name == "auto":
            return None
        dtype = DTYPES[name]
        if all(p.dtype == dtype for p in self.policy.parameters() if p.is_floating_point()):
            return None
        return dtype

    def sampler_logprobs_are_trainers(self) -> bool:
        """Whether the log-probs recorded while sampling are the trainer's (the ``hf`` engine on the
        policy itself); else the old log-probs come from the trainer's forward (``rollout_logprobs``)
        and the mismatch is logged (``engine_correction``)."""
        return self.generation.engine == "hf" and self.sampler_dtype() is None

    def sampling_model(self) -> torch.nn.Module:
        """What the ``hf`` engine samples from: the policy, or its ``generation.dtype`` copy (built on
        first use, brought up to date first if the policy moved since its last update)."""
        if self.sampler_dtype() is None:
            return self.policy
        self.update_sampler_copy()
        return self._sampler_copy.model

    def update_sampler_copy(self) -> None:
        """Write the policy's weights into the sampling copy (in place) if it exists and is behind the
        policy, or build it when asked for and missing; the time goes to ``time/weight_sync``. Called
        after each policy optimiser step (``clip_and_step``) and before sampling."""
        if self.sampler_dtype() is None:
            return
        if self._sampler_copy is None:
            with self.timed("weight_sync"):
                self._sampler_copy = SamplerCopy(self.policy, self.sampler_dtype())
        elif self._sampler_version != self._policy_version:
            with self.timed("weight_sync"):
                self._sampler_copy.sync(self.policy)
        self._sampler_version = self._policy_version

    def rollout_engine(self):
        """The colocated ``VLLMEngine`` (``generation.engine == "vllm"``), built on first use."""
        if self._engine is None:
            from ..rollout.vllm_engine import VLLMEngine

            with self.timed("engine_start"):
                self._engine = VLLMEngine(self.policy, self.generation.vllm, seed=self.seed)  # + rank // tp inside
        return self._engine

    def sync_engine(self, force: bool = False) -> bool:
        """Push the policy's weights into the engine if it never got them or the policy made
        ``generation.vllm.sync_every`` optimiser steps since (or ``force``). Returns whether it synced;
        the time goes to ``time/weight_sync``. Under FSDP2 every rank must call it (each gathers
        the full weights parameter by parameter)."""
        engine = self.rollout_engine()
        behind = None if engine.synced_version is None else self._policy_version - engine.synced_version
        if not force and behind is not None and behind < self.generation.vllm.sync_every:
            return False
        with self.timed("weight_sync"):
            engine.sync_weights(self.policy, version=self._policy_version)
        return True

    def close_engine(self) -> None:
        """Shut the vllm engine down (at the end of fit; the next rollout builds a new one)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        self.close_engine()
        self._sampler_copy = None  # rebuilt from the policy by the next rollout (its weights may be reloaded)

    def engine_correction(
        self, mb: Rollout, old_logprobs: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The TIS weights of a micro-batch (None with ``tis_cap`` off) and the engine-vs-trainer
        statistics (``rollout/logprob_diff_mean`` / ``_max``, ``rollout/tis_weight_mean`` /
        ``rollout/tis_clip_frac``; logged as their mean over micro-batches; none with TIS off where
        the sampler's log-probs are the trainer's: the ``hf`` engine without a ``generation.dtype`` copy).

        ``old_logprobs``: ``(n, R)`` the trainer's log-probs of the rollout policy; the engine's are
        ``mb.logprobs``."""
        if self.tis_cap is None and self.sampler_logprobs_are_trainers():
            return None, {}
        weights, stats = truncated_importance_weights(
            old_logprobs, mb.logprobs, mb.response_mask, self.tis_cap or 1.0
        )
        out = {
            "rollout/logprob_diff_mean": stats["logprob_diff_mean"],
            "rollout/logprob_diff_max": stats["logprob_diff_max"],
        }
        if self.tis_cap is None:
            return None, out
        out["rollout/tis_weight_mean"] = stats["tis_weight_mean"]
        out["rollout/tis_clip_frac"] = stats["tis_clip_frac"]
        return weights, out
