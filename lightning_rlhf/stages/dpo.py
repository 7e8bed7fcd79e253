"""Direct preference optimisation: DPO and its relatives (IPO, hinge, robust, SimPO), ORPO and RPO.

One forward gives the policy's log-probs of the chosen and rejected completions: by default one row
``[prompt, chosen, rejected]`` per pair (``share_prompt``: the prompt is computed once, see
:mod:`lightning_rlhf.core.prefix`), else the concatenated ``(2B, T)`` preference batch (chosen rows
``[:B]``, rejected rows ``[B:]``). The reference's come from

- the same weights with the LoRA adapter disabled (``with policy.disable_adapter():``) when the
  policy is a LoRA model: no second copy in memory;
- otherwise a frozen copy loaded from ``reference`` (default: the policy's folder);
- or, with ``precompute_ref_logps``, a cache filled by one pass over the train and val data at the
  start of fit (keyed by split and the batch's record ``index``), after which the reference is freed;
- nothing for the reference-free losses (``simpo``, ``orpo``).

Losses come from :mod:`lightning_rlhf.core.losses`; metric names are TRL's (``rewards/margins``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from ..core.losses import dpo_loss, orpo_loss
from ..core.ops import logprobs_from_logits, masked_sum
from ..core.packing import gather_packed, unpack
from ..core.prefix import PAD, SharedPrompt, attention_allowed, completion_columns, share_prompt
from ..models import ModelSpec, as_spec, disable_dropout, is_peft, load_causal_lm
from ..models.forward import packed_forward, sequence_logprobs, shared_prompt_mask
from ..rollout.generate import eval_mode
from .common import OfflineStageModule, OptimSpec, check_pair_packing

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("simpo", "orpo", "ipo")


class DPOModule(OfflineStageModule):
    """Preference optimisation of a causal LM against a frozen reference.

    Batches come from ``RLHFDataModule`` with ``kind="preference"``. Runs under ``Trainer``/
    LightningCLI and in a user's Fabric loop (``configure_model()``, then
    ``precompute_reference_logps({"train": loader, ...})`` if you want the cache,
    ``configure_optimizers()``, ``training_step(batch, i)``).

    Args:
        policy: the model to train, usually the SFT folder (dtype, LoRA, 4-bit, checkpointing).
        reference: the frozen reference when the policy is not a LoRA model. None: the policy's
            folder (same dtype). Ignored with LoRA (the reference is the adapter-disabled policy)
            and for the reference-free losses.
        tokenizer: tokenizer folder; defaults to ``policy.path``.
        optim: optimiser and learning-rate schedule.
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, ``simpo`` (reference-free),
            as in ``core.losses.dpo_loss``, or ``orpo`` (reference-free: NLL on chosen plus the
            odds-ratio term of ``core.losses.orpo_loss``).
        beta: DPO's beta (SimPO's beta, typically 2-2.5; ORPO's lambda, typically 0.1).
        label_smoothing: conservative-DPO / robust-DPO flip rate ``eps`` in [0, 0.5).
        simpo_gamma: SimPO's target reward margin.
        rpo_alpha: weight of an NLL term on the chosen completions added to the loss (RPO, Pang et
            al. 2024). None: off. (ORPO always has its NLL term, with weight 1.)
        length_normalise: average the completion log-probs over their tokens instead of summing.
            None: as the loss's paper does (TRL's choice): averaged for simpo, orpo and ipo,
            summed for the others.
        precompute_ref_logps: compute the reference log-probs once over the train and val data at
            the start of fit, then free the reference, so training holds one model.
        disable_dropout: set every dropout of the policy and reference to 0 (as TRL does), so that
            the log-ratios are not dropout noise.
        share_prompt: score each pair in one row ``[prompt, chosen, rejected]`` (the rejected tokens
            attend to the prompt but not to the chosen ones; :mod:`lightning_rlhf.core.prefix`), so the
            prompt goes through the policy and the reference once instead of twice. Same log-probs
            up to float rounding. Needs sdpa or eager attention (else the pairs are scored apart).
        output_dir: where the trained policy is saved as a Hugging Face folder at the end of fit.
        merge_lora: export a LoRA model merged into its base (else the adapter folder).
        padding_free: with ``share_prompt``, pack several ``[prompt, chosen, rejected]`` rows into
            one row of at most the longest one's length (``core.packing``: block-diagonal mask, each
            pair's own positions), so short pairs share a row instead of padding; same log-probs.
        packed_length: with ``padding_free``, the tokens of a packed row (at least the batch's longest
            shared row; None: that longest row, so only pairs that fit beside each other share a row).
            Longer rows pack more pairs at a quadratic attention cost (dense 4D mask).
    """

    data_kind = "preference"

    def __init__(
        self,
        policy: ModelSpec | str,
        reference: ModelSpec | str | None = None,
        tokenizer: str | None = None,
        optim: OptimSpec | None = None,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        length_normalise: bool | None = None,
        precompute_ref_logps: bool = False,
        disable_dropout: bool = True,
        share_prompt: bool = True,
        output_dir: str | None = None,
        merge_lora: bool = True,
        padding_free: bool = False,
        packed_length: int | None = None,
    ):
        if loss_type not in LossType.__args__:
            raise ValueError(f"loss_type must be one of {LossType.__args__}, got {loss_type!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type in ("ipo", "hinge", "orpo"):
            raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
        policy = as_spec(policy)
        super().__init__(tokenizer or policy.path, output_dir, merge_lora)
        self.policy_spec = policy
        self.reference_spec = as_spec(reference) if reference is not None else None
        self.optim = optim or OptimSpec()
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma
        self.rpo_alpha = rpo_alpha
        self.length_normalise = (
            loss_type in LENGTH_NORMALISED if length_normalise is None else length_normalise
        )
        self.precompute_ref_logps = precompute_ref_logps
        self.disable_dropout = disable_dropout
        check_pair_packing("DPOModule", share_prompt, padding_free, packed_length)
        self.share_prompt = share_prompt
        self.padding_free = padding_free
        self.packed_length = packed_length
        self.policy: torch.nn.Module | None = None
        # split -> (N, 2) fp32 summed reference log-probs of (chosen, rejected) by record index; NaN = missing
        self.ref_cache: dict[str, torch.Tensor] = {}
        self.save_hyperparameters()

    # --------------------------------------------------------------------------------- models

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model (None: LoRA's disabled adapter, a reference-free loss, or freed
        after precomputing its log-probs)."""
        return self._frozen.get("reference")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def configure_model(self) -> None:
        no_dropout = disable_dropout if self.disable_dropout else (lambda m: m)
        if self.policy is None:
            self.policy = self.shard(no_dropout(load_causal_lm(self.policy_spec)))
        if (
            self.reference is None
            and self.needs_reference
            and not is_peft(self.policy)
            and not self.ref_cache
        ):
            self.hold_frozen(
                "reference", self.shard(no_dropout(load_causal_lm(self._reference_spec(), trainable=False)))
            )  # the frozen reference: not a submodule (StageModule.hold_frozen)

    def _reference_spec(self) -> ModelSpec:
        if self.reference_spec is not None:
            return self.reference_spec
        # The policy's starting point, frozen: same folder, dtype and seed, no adapter or k-bit prep.
        return dataclasses.replace(self.policy_spec, lora=None, gradient_checkpointing=False)

    def exported_model(self):
        return self.policy

    # ------------------------------------------------------------------------------- log-probs

    def _forward_kwargs(self, batch: dict) -> dict:
        """Inputs of one concatenated forward, scoring only the columns from the first completion token on."""
        loss_mask = batch["loss_mask"]  # (2B, T)
        t = loss_mask.shape[1]
        first = int(loss_mask.long().argmax(-1).min())  # earliest completion token over the rows (>= 1)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "position_ids": batch.get("position_ids"),
            "logits_to_keep": t - max(first, 1),
        }

    def completion_logps(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of the completion tokens and their counts: ``(2B,)`` fp32, ``(2B,)``."""
        if self.share_prompt:
            out = self._shared_completion_logps(model, batch)
            if out is not None:
                return out
        kwargs = self._forward_kwargs(batch)
        keep = kwargs["logits_to_keep"]
        logps, _ = sequence_logprobs(model, **kwargs)  # (2B, keep): labels input_ids[:, T-keep:]
        mask = batch["loss_mask"][:, -keep:]  # (2B, keep)
        return masked_sum(logps, mask, dim=-1), mask.sum(-1).float()

    def _shared_completion_logps(
        self, model: torch.nn.Module, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`completion_logps` from one ``[prompt, chosen, rejected]`` row per pair (None: the
        model's attention takes no custom mask, or a pair has no prompt)."""
        shared = share_prompt(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        if shared is None:
            return None
        chosen_cols, rejected_cols, branch_col, branch_label = completion_columns(shared)  # (B, T'-1) x2, (B,) x2
        if self.padding_free:
            out = packed_shared_logps(
                model, shared, chosen_cols, rejected_cols, branch_col, branch_label, max_tokens=self.packed_length
            )
            if out is not None:
                return out
        mask = shared_prompt_mask(model, attention_allowed(shared.segment))
        if mask is None:
            return None
        first = int(branch_col.min())  # earliest next-token column scored: the LM head skips the rest
        keep = shared.input_ids.shape[1] - 1 - first
        logits = model(
            input_ids=shared.input_ids,
            attention_mask=mask,
            position_ids=shared.position_ids,
            use_cache=False,
            logits_to_keep=keep + 1,
        ).logits[:, :-1]  # (B, keep, V): next-token columns first .. T'-2
        logps = logprobs_from_logits(logits, shared.input_ids[:, first + 1 :])  # (B, keep)
        rows = torch.arange(logits.shape[0], device=logits.device)
        branch = logprobs_from_logits(logits[rows, branch_col - first], branch_label)  # (B,) first rejected token
        chosen = masked_sum(logps, chosen_cols[:, first:], dim=-1)
        rejected = masked_sum(logps, rejected_cols[:, first:], dim=-1) + branch
        counts = torch.cat([shared.chosen_len, shared.rejected_len]).float()
        return torch.cat([chosen, rejected]), counts

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """Summed reference log-probs of the completions, ``(2B,)`` fp32, computed now."""
        if is_peft(self.policy):
            with eval_mode(self.policy), self.policy.disable_adapter():
                return self.completion_logps(self.policy, batch)[0]
        if self.reference is None:
            raise RuntimeError(
                "DPOModule: no reference model (it was freed after precomputing) and no cached log-probs "
                "for this batch"
            )
        with self.frozen_on_device("reference") as reference, eval_mode(reference):
            return self.completion_logps(reference, batch)[0]

    def _cached_reference_logps(self, batch: dict, split: str) -> torch.Tensor | None:
        cache = self.ref_cache.get(split)
        if cache is None:
            return None
        index = batch["index"].cpu()
        if int(index.max()) >= cache.shape[0] or bool(cache[index].isnan().any()):
            missing = [int(i) for i in index if i >= cache.shape[0] or cache[i].isnan().any()]
            raise RuntimeError(
                f"DPOModule: no precomputed reference log-probs for {split} records {missing[:10]}; "
                "the data changed after precompute_reference_logps"
            )
        pair = cache[index].to(self.device)  # (B, 2)
        return torch.cat([pair[:, 0], pair[:, 1]])  # (2B,) chosen rows first

    @torch.no_grad()
    def precompute_reference_logps(
        self, loaders: Mapping[str, Iterable[dict]], free_reference: bool = True
    ) -> None:
        """Fill the reference cache from ``{split: batches}`` (``"train"``, ``"val"``), then free the reference."""
        for split, loader in loaders.items():
            if loader is None:
                continue
            rows: dict[int, torch.Tensor] = {}
            for batch in loader:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with self._precision_context():
                    ref = self.reference_logps(batch).float().cpu()  # (2B,)
                b = ref.shape[0] // 2
                for j, i in enumerate(batch["index"].tolist()):
                    rows[i] = torch.stack([ref[j], ref[b + j]])
            cache = torch.full((max(rows, default=-1) + 1, 2), float("nan"))
            for i, v in rows.items():
                cache[i] = v
            self.ref_cache[split] = cache
        if free_reference and self.reference is not None:
            del self._frozen["reference"]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _precision_context(self):
        trainer = getattr(self, "_trainer", None)
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    def on_fit_start(self) -> None:
        if not (self.precompute_ref_logps and self.needs_reference) or self.ref_cache:
            return
        # Before the sanity check, which already needs reference log-probs for the val batches.
        self.precompute_reference_logps(self._fit_loaders())

    def _fit_loaders(self) -> dict[str, Iterable[dict] | None]:
        trainer = self.trainer
        if trainer.datamodule is not None:
            dm = trainer.datamodule
            return {"train": dm.train_dataloader(), "val": dm.val_dataloader() or None}
        # Loaders passed to fit() directly: Lightning keeps their sources on the loops.
        loaders = {}
        for split, loop in (("train", trainer.fit_loop), ("val", trainer.fit_loop.epoch_loop.val_loop)):
            source = getattr(loop, "_data_source", None)
            loaders[split] = source.dataloader() if source is not None and source.is_defined() else None
        return loaders

    # ---------------------------------------------------------------------------------- losses

    def _loss(self, batch: dict, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, lengths = self.completion_logps(self.policy, batch)  # (2B,), (2B,)
        b = sums.shape[0] // 2
        logps = sums / lengths.clamp(min=1) if self.length_normalise else sums
        chosen, rejected = logps[:b], logps[b:]
        nll = -sums[:b].sum() / lengths[:b].sum().clamp(min=1)  # token-mean NLL of the chosen completions
        stats: dict[str, torch.Tensor] = {}
        if self.loss_type == "orpo":
            losses, chosen_r, rejected_r = orpo_loss(chosen, rejected, beta=self.beta)
            loss = nll + losses.mean()
            stats["nll_loss"] = nll.detach()
            stats["log_odds_loss"] = losses.mean().detach()
        else:
            ref_c = ref_r = None
            if self.needs_reference:
                ref = self._cached_reference_logps(batch, split)
                if ref is None:
                    ref = self.reference_logps(batch)
                if self.length_normalise:
                    ref = ref / lengths.clamp(min=1)
                ref_c, ref_r = ref[:b], ref[b:]
            losses, chosen_r, rejected_r = dpo_loss(
                chosen,
                rejected,
                ref_c,
                ref_r,
                beta=self.beta,
                loss_type=self.loss_type,
                label_smoothing=self.label_smoothing,
                gamma=self.simpo_gamma,
            )
            loss = losses.mean()
            if self.rpo_alpha is not None:
                loss = loss + self.rpo_alpha * nll
                stats["nll_loss"] = nll.detach()
        stats.update(
            {
                "rewards/chosen": chosen_r.mean(),
                "rewards/rejected": rejected_r.mean(),
                "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                "rewards/margins": (chosen_r - rejected_r).mean(),
                "logps/chosen": chosen.detach().mean(),
                "logps/rejected": rejected.detach().mean(),
            }
        )
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self._loss(batch, "train")
        bs = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in stats.items():
            self.log(f"train/{name}", value, prog_bar=name == "rewards/accuracies", batch_size=bs)
        tps = self.throughput(int(batch["attention_mask"].sum()))
        if tps is not None:
            self.log("train/tokens_per_s", tps, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self._loss(batch, "val")
        bs = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in stats.items():
            self.log(
                f"val/{name}", value, prog_bar=name == "rewards/accuracies", batch_size=bs, sync_dist=True
            )
        return loss


def packed_shared_logps(
    model: torch.nn.Module,
    shared: SharedPrompt,
    chosen_cols: torch.Tensor,
    rejected_cols: torch.Tensor,
    branch_col: torch.Tensor,
    branch_label: torch.Tensor,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``DPOModule.completion_logps`` of shared-prompt rows packed several to a row (of ``max_tokens``)
    (``models.forward.packed_forward``; the arguments as ``core.prefix.completion_columns`` gives them),
    or None when packing saves nothing or the model cannot take the mask (score the rows as they are)."""
    b, width = shared.input_ids.shape
    real = shared.segment != PAD  # (B, T')
    col = torch.arange(width, device=real.device)[None]
    keep = real & (col >= branch_col[:, None]) & (col < width - 1)  # the columns that predict a completion token
    packed = packed_forward(
        model, shared.input_ids, real, shared.position_ids, keep=keep, allowed=attention_allowed(shared.segment),
        max_tokens=max_tokens,
    )
    if packed is None:
        return None
    packing, kwargs = packed
    logits = model(**kwargs, logits_to_keep=packing.keep).logits  # (B', K, V): the kept columns
    next_ids = torch.cat([shared.input_ids[:, 1:], shared.input_ids[:, :1]], dim=1)  # (B, T') row labels
    packed_logps = logprobs_from_logits(logits, gather_packed(next_ids, packing)[:, -packing.keep :])  # (B', K)
    logps = unpack(packed_logps, packing)[:, :-1]  # (B, T'-1)
    rows = torch.arange(b, device=real.device)
    slot = packing.index[rows, branch_col]  # (B,) the branch column's place in the flattened (B', K)
    branch = logprobs_from_logits(logits.reshape(-1, logits.shape[-1])[slot], branch_label)  # (B,)
    chosen = masked_sum(logps, chosen_cols, dim=-1)
    rejected = masked_sum(logps, rejected_cols, dim=-1) + branch
    counts = torch.cat([shared.chosen_len, shared.rejected_len]).float()
    return torch.cat([chosen, rejected]), counts
