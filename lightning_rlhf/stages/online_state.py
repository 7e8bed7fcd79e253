"""Checkpoint state of the online stages outside the modules and optimisers: the KL controller,
the reward normaliser, every rank's rollout generator, the rollout step and the skipped-step count.

:class:`OnlineCheckpointState` is a mixin of :class:`~lightning_rlhf.stages.online.OnlineRLModule`;
Lightning checkpoints carry it under ``"online_rl"``, Fabric users save ``online_state_dict()``.
"""

from __future__ import annotations

from ..models.distributed import all_gather_object, rank, world_size


class OnlineCheckpointState:
    """``online_state_dict`` / ``load_online_state_dict`` and the Lightning checkpoint hooks (a mixin)."""

    def online_state_dict(self) -> dict:
        """State outside the modules and optimisers: KL controller, reward normaliser, rollout RNG,
        step counter. Saved in Lightning checkpoints (``on_save_checkpoint``); Fabric users save it
        themselves next to the module and optimisers.

        Each rank has its own rollout generator (seeded ``seed + rank``) while a checkpoint holds one
        copy of this state (rank 0's), so every rank's generator state is gathered into it
        (``generators``, in rank order; a collective: every rank calls it)."""
        gen = self.generator.get_state()
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "generator": gen,
            "generators": all_gather_object(gen),
            "rollout_step": self.rollout_step,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_online_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.rollout_step = int(state["rollout_step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        gens = state.get("generators")
        # this rank's generator when saved at the same world size (else rank 0's, as before)
        gen = gens[rank()] if gens is not None and len(gens) == world_size() else state["generator"]
        self._pending_generator_state = gen.cpu()
        self._generator = None  # rebuilt (with this state) on first use, on the right device

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_rl"] = self.online_state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "online_rl" in checkpoint:
            self.load_online_state_dict(checkpoint["online_rl"])
