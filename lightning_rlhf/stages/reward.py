"""Reward modelling: a one-label sequence classifier trained on preference pairs (Bradley-Terry).

The score of a sequence is read at its last real token (found from ``attention_mask``, so right
padding with pad == eos is fine) by :func:`lightning_rlhf.rollout.scoring.last_token_scores`; the
loss is :func:`lightning_rlhf.core.losses.reward_loss`. The exported folder loads with
``AutoModelForSequenceClassification.from_pretrained`` and is the PPO stage's frozen reward model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from ..core.losses import reward_loss
from ..core.prefix import PAD, attention_allowed, last_positions, share_prompt
from ..data import Encoder, Where, pad
from ..data.records import is_conversational
from ..evaluation import spearman
from ..models import ModelSpec, as_spec, load_sequence_classifier
from ..models.forward import packed_forward, shared_prompt_mask
from ..rollout.generate import eval_mode
from ..rollout.scoring import last_token_scores, packed_scores
from .common import OfflineStageModule, OptimSpec, check_pair_packing

Prompt = str | list[dict]
Response = str | list[dict]


class RewardModule(OfflineStageModule):
    """Train a reward model on preference pairs.

    Batches come from ``RLHFDataModule`` with ``kind="preference"``: rows ``[:B]`` are prompt +
    chosen, rows ``[B:]`` prompt + rejected, scored in one forward pass: of ``B`` rows
    ``[prompt, chosen, rejected]`` with ``share_prompt`` (the default), else of the ``2B`` rows.
    Runs under ``Trainer``/LightningCLI and in a user's Fabric loop (``configure_model()``,
    ``configure_optimizers()``, ``training_step(batch, i)``).

    Args:
        model: the backbone, usually the SFT folder; loaded as ``AutoModelForSequenceClassification``
            with one label (a new, seeded ``score`` head). With ``lora``, ``score`` is added to
            ``modules_to_save`` so the head is trained and exported with the adapter.
        tokenizer: tokenizer folder; defaults to ``model.path``.
        optim: optimiser and learning-rate schedule.
        center_coef: weight of the reward-centering term ``mean((r_c + r_r) ** 2)`` (Eisenstein et
            al. 2023; TRL's ``center_rewards_coefficient``). 0: off.
        use_margin: subtract the batch's ``margin`` column from ``r_c - r_r`` in the loss (Llama 2).
        share_prompt: score each pair in one row ``[prompt, chosen, rejected]`` (the rejected tokens
            attend to the prompt but not to the chosen ones; :mod:`lightning_rlhf.core.prefix`): the
            prompt goes through the model once instead of twice. Same scores up to float rounding.
            Needs sdpa or eager attention (else the pairs are scored apart).
        output_dir: where the trained model is saved as a Hugging Face folder at the end of fit.
        merge_lora: export a LoRA model merged into its base (else the adapter folder).
        padding_free: with ``share_prompt``, pack several ``[prompt, chosen, rejected]`` rows into
            one row of at most the longest one's length (``core.packing``: block-diagonal mask, each
            pair's own positions), so short pairs share a row instead of padding; same scores.
        packed_length: with ``padding_free``, the tokens of a packed row (at least the batch's longest
            shared row; None: that longest row). Longer rows pack more pairs at a quadratic attention
            cost (dense 4D mask).
    """

    data_kind = "preference"

    def __init__(
        self,
        model: ModelSpec | str,
        tokenizer: str | None = None,
        optim: OptimSpec | None = None,
        center_coef: float = 0.0,
        use_margin: bool = True,
        share_prompt: bool = True,
        output_dir: str | None = None,
        merge_lora: bool = True,
        padding_free: bool = False,
        packed_length: int | None = None,
    ):
        model = as_spec(model)
        if model.lora is not None:
            model = _with_score_head_saved(model)
        super().__init__(tokenizer or model.path, output_dir, merge_lora)
        self.model_spec = model
        self.optim = optim or OptimSpec()
        self.center_coef = center_coef
        self.use_margin = use_margin
        check_pair_packing("RewardModule", share_prompt, padding_free, packed_length)
        self.share_prompt = share_prompt
        self.padding_free = padding_free
        self.packed_length = packed_length
        self.model: torch.nn.Module | None = None
        self.train_accuracy = BinaryAccuracy()
        self.val_accuracy = BinaryAccuracy()
        self.val_reward_mean = MeanMetric()  # E[r] over chosen and rejected
        self.val_reward_sq = MeanMetric()  # E[r^2]: std = sqrt(E[r^2] - E[r]^2)
        self.val_margin = MeanMetric()
        self.save_hyperparameters()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.shard(load_sequence_classifier(self.model_spec))

    def exported_model(self):
        return self.model

    # ------------------------------------------------------------------------------ training

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and rejected rows: ``(B,)`` each, fp32."""
        if self.share_prompt and "loss_mask" in batch:
            shared = share_prompt(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            index = None if shared is None else torch.stack(last_positions(shared), dim=1)  # (B, 2): last tokens
            packed = None
            if shared is not None and self.padding_free:
                keep = torch.zeros_like(shared.segment, dtype=torch.bool).scatter_(1, index, True)
                real = shared.segment != PAD
                packed = packed_forward(
                    self.model, shared.input_ids, real, shared.position_ids, keep=keep,
                    allowed=attention_allowed(shared.segment), max_tokens=self.packed_length,
                )  # fmt: skip
            if packed is not None:  # several pairs per row: the scores at the kept (last) tokens
                scores = packed_scores(self.model, packed, index)  # (B, 2)
                return scores[:, 0], scores[:, 1]
            mask = None if shared is None else shared_prompt_mask(self.model, attention_allowed(shared.segment))
            if mask is not None:
                scores = last_token_scores(self.model, shared.input_ids, mask, shared.position_ids, index=index)
                return scores[:, 0], scores[:, 1]
        scores = last_token_scores(
            self.model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        )  # (2B,)
        b = scores.shape[0] // 2
        return scores[:b], scores[b:]

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = self(batch)
        margin = batch.get("margin") if self.use_margin else None
        loss = reward_loss(chosen, rejected, margin=margin, center_coef=self.center_coef)
        return loss, chosen, rejected

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self._step(batch)
        bs = chosen.shape[0]
        batch_accuracy = self.train_accuracy(_wins(chosen, rejected), torch.ones_like(chosen, dtype=torch.long))
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        # Fabric's log takes numbers only: this batch's accuracy there (the Trainer averages the metric)
        accuracy = self.train_accuracy if self._fabric is None else batch_accuracy
        self.log("train/accuracy", accuracy, prog_bar=True, batch_size=bs)
        rewards = torch.cat([chosen, rejected]).detach()
        self.log("train/margin_mean", (chosen - rejected).detach().mean(), batch_size=bs)
        self.log("train/reward_mean", rewards.mean(), batch_size=bs)
        self.log("train/reward_std", rewards.std(), batch_size=bs)
        tps = self.throughput(int(batch["attention_mask"].sum()))
        if tps is not None:
            self.log("train/tokens_per_s", tps, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self._step(batch)
        bs = chosen.shape[0]
        rewards = torch.cat([chosen, rejected])
        self.val_accuracy.update(_wins(chosen, rejected), torch.ones_like(chosen, dtype=torch.long))
        self.val_reward_mean.update(rewards)
        self.val_reward_sq.update(rewards.square())
        self.val_margin.update(chosen - rejected)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.val_reward_mean.update_count == 0:
            return
        mean, sq = self.val_reward_mean.compute(), self.val_reward_sq.compute()
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log("val/margin_mean", self.val_margin.compute())
        self.log("val/reward_mean", mean)
        self.log("val/reward_std", (sq - mean.square()).clamp(min=0).sqrt())
        for m in (self.val_accuracy, self.val_reward_mean, self.val_reward_sq, self.val_margin):
            m.reset()


    # -------------------------------------------------------------------------------- scoring

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[Response], batch_size: int = 32
    ) -> list[float]:
        """Scores of ``(prompt, response)`` pairs as floats; see :func:`score_texts`."""
        if self.model is None:
            self.configure_model()
        return score_texts(self.model, self.tokenizer, prompts, responses, batch_size=batch_size)


def _with_score_head_saved(spec: ModelSpec) -> ModelSpec:
    """The spec with ``score`` in LoRA's ``modules_to_save``: the new head must be trained and saved."""
    saved = list(spec.lora.modules_to_save or [])
    if "score" not in saved:
        saved.append("score")
    return dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, modules_to_save=saved))


def _wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response scores strictly higher (a tie counts as a miss)."""
    return (chosen > rejected).long().detach()


# ---------------------------------------------------------------------------------- scoring text


def encode_pair(encoder: Encoder, prompt: Prompt, response: Response, index: int = 0) -> list[int]:
    """Token ids of prompt + response exactly as the data layer builds a preference row.

    A conversational prompt (a list of messages) goes through the chat template with the generation
    prompt and the response is rendered as the assistant turn after it (a plain string response is
    wrapped as ``{"role": "assistant", "content": response}``); a plain-text prompt gets the
    tokenizer's leading special tokens and the response text is appended as is. EOS is appended to
    a response that lacks it, as in training.
    """
    where = Where("score_texts", index)
    if is_conversational(prompt):
        completion = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        p, c = encoder.split_chat(prompt, completion, where, "response")
    else:
        if isinstance(response, list):
            raise ValueError(f"{where}: a conversational response needs a conversational prompt")
        p, c = encoder.prompt(prompt), encoder.text(response)
    return p + encoder.completion(c)


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[Response],
    batch_size: int = 32,
) -> list[float]:
    """Reward-model scores of ``(prompt, response)`` pairs, one float each.

    Tokenises like the data layer (:func:`encode_pair`: chat template for conversational prompts),
    batches ``batch_size`` pairs right-padded, and reads each score at the last real token.

    Args:
        model: a one-label ``AutoModelForSequenceClassification`` (or a peft wrapper of one).
        tokenizer: the tokenizer the model was trained with.
        prompts: str or list of messages, one per response.
        responses: str (or list of assistant messages), one per prompt.
        batch_size: pairs per forward.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts for {len(responses)} responses")
    encoder = Encoder(tokenizer)
    rows = [encode_pair(encoder, p, r, i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = pad(chunk, pad_id).to(device)  # (b, T)
            mask = pad([[1] * len(r) for r in chunk], 0, ids.shape[1]).to(device)  # (b, T)
            out.extend(last_token_scores(model, ids, mask).tolist())
    return out


def evaluate_pairs(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    gold_reward=None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Pairwise accuracy of a reward model on explicit-prompt preference records.

    Returns ``{"accuracy", "pairs"}`` and, when ``gold_reward(prompt_text, response_text)`` is given,
    ``"spearman"``: the rank correlation of the model's scores with the gold reward over every
    chosen and rejected response. Conversational prompts/responses are scored through the chat
    template; the gold reward gets the text of the last user and assistant messages.
    """
    prompts = [r["prompt"] for r in records]
    chosen = [r["chosen"] for r in records]
    rejected = [r["rejected"] for r in records]
    s = score_texts(model, tokenizer, prompts + prompts, chosen + rejected, batch_size=batch_size)
    n = len(records)
    out = {"pairs": float(n), "accuracy": sum(c > r for c, r in zip(s[:n], s[n:], strict=True)) / max(n, 1)}
    if gold_reward is not None:
        gold = [
            gold_reward(_text(p), _text(c)) for p, c in zip(prompts + prompts, chosen + rejected, strict=True)
        ]
        out["spearman"] = spearman(s, gold)
    return out


def _text(x: Prompt | Response) -> str:
    return x if isinstance(x, str) else x[-1]["content"]
