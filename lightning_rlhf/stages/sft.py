"""Supervised fine-tuning: next-token cross-entropy on completions (prompt tokens masked)."""

from __future__ import annotations

import torch

from ..core.losses import sft_loss
from ..data import model_inputs
from ..models import ModelSpec, as_spec, load_causal_lm
from .common import OfflineStageModule, OptimSpec


class SFTModule(OfflineStageModule):
    """Supervised fine-tuning of a causal LM.

    Runs under ``Trainer``/LightningCLI (automatic optimisation) and in a user's Fabric loop
    (``module.configure_model()``, ``module.configure_optimizers()``, ``module.training_step(batch, i)``).
    Batches come from ``RLHFDataModule`` with ``kind="sft"``: the loss covers ``loss_mask`` tokens.

    Args:
        policy: the model to fine-tune (folder, dtype, LoRA, 4-bit, gradient checkpointing).
        tokenizer: tokenizer folder; defaults to ``policy.path``.
        optim: optimiser and learning-rate schedule.
        output_dir: where the trained model is saved as a Hugging Face folder at the end of fit.
        merge_lora: export a LoRA model merged into its base (else the adapter folder).
    """

    data_kind = "sft"

    def __init__(
        self,
        policy: ModelSpec | str,
        tokenizer: str | None = None,
        optim: OptimSpec | None = None,
        output_dir: str | None = None,
        merge_lora: bool = True,
    ):
        policy = as_spec(policy)
        super().__init__(tokenizer or policy.path, output_dir, merge_lora)
        self.policy_spec = policy
        self.optim = optim or OptimSpec()
        self.policy: torch.nn.Module | None = None
        self.save_hyperparameters()

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.shard(load_causal_lm(self.policy_spec))

    def exported_model(self):
        return self.policy

    def _loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        logits = self.policy(**model_inputs(batch)).logits  # (B, T, V)
        loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, int(batch["loss_mask"].sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        tps = self.throughput(int(batch["attention_mask"].sum()) if batch["attention_mask"].dim() == 2 else n_tokens)
        if tps is not None:
            self.log("train/tokens_per_s", tps, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        # Token-weighted across batches: Lightning's mean weights by batch_size.
        self.log("val/loss", loss, prog_bar=True, batch_size=n_tokens, sync_dist=True)
        return loss
