"""Evaluation of a policy on held-out prompts: gold and proxy reward, KL to a reference, length.

Every model of a pipeline is evaluated here with the same prompts, sampling settings and seed, so
that the report compares like with like and never copies numbers from training logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from .core.losses import sft_loss
from .data import RLHFDataModule, model_inputs
from .rollout import GenerationSpec, RewardModelScorer, generate, import_function


@dataclass
class SamplingSpec(GenerationSpec):
    """Sampling settings of an evaluation (the same for every model compared): the rollout's
    :class:`GenerationSpec` with evaluation defaults, plus a seed and a batch size."""

    max_new_tokens: int = 32
    num_samples: int = 4
    """Responses per prompt. ``temperature`` 1.0 samples the model's own distribution, so ``kl_to_ref``
    is the KL of what is sampled."""
    seed: int = 1234
    """Seed of the sampling generator, reset for each model."""
    batch_size: int = 64
    """Prompts per generation batch."""


def _mean_std(xs: list[float]) -> dict[str, float]:
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan")}
    m = sum(xs) / n
    return {"mean": m, "std": math.sqrt(sum((x - m) ** 2 for x in xs) / n)}


def _functions(fns) -> dict[str, Any]:
    if fns is None:
        return {}
    if isinstance(fns, dict):
        return {k: import_function(v) if isinstance(v, str) else v for k, v in fns.items()}
    out = {}
    for f in fns:
        f = import_function(f) if isinstance(f, str) else f
        out[f.__name__] = f
    return out


def prompt_loader(prompt_files, tokenizer, *, batch_size: int, max_prompt_length: int = 256, max_prompts: int | None = None):
    dm = RLHFDataModule(
        train_files=prompt_files, kind="prompt", tokenizer=tokenizer, batch_size=batch_size,
        max_prompt_length=max_prompt_length, shuffle=False,
    )
    dm.setup("fit")
    if max_prompts is not None:
        dm.train_examples = dm.train_examples[:max_prompts]
    return dm.train_dataloader()


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    tokenizer,
    prompt_files: str | list[str],
    *,
    gold: dict | list | None = None,
    reward_model: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    sampling: SamplingSpec | None = None,
    max_prompts: int | None = None,
    n_examples: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample ``sampling.num_samples`` responses per held-out prompt and measure them.

    Returns ``{"gold_reward": {"mean", "std"}, ...}`` with one entry per gold function (the first
    also under ``gold_reward``), ``proxy_reward`` (reward model, if given), ``kl_to_ref`` (mean over
    samples of the per-sequence sum of ``log p(y_t) - log p_ref(y_t)`` on the policy's own samples:
    an unbiased estimate of KL(policy || reference) at temperature 1), ``response_len``,
    ``truncated_frac``, ``n_prompts``, ``n_samples`` and a few ``examples``.
    """
    sampling = sampling or SamplingSpec()
    gold_fns = _functions(gold)
    device = next(policy.parameters()).device
    # Everything follows the policy's device: the sampling generator (the sampler's torch.rand needs
    # it on the probabilities' device) and the frozen models scored against it.
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    for frozen in (reward_model, reference):
        if frozen is not None:
            frozen.to(device)
    loader = prompt_loader(prompt_files, tokenizer, batch_size=sampling.batch_size, max_prompts=max_prompts)
    scores: dict[str, list[float]] = {name: [] for name in gold_fns}
    proxy: list[float] = []
    kls: list[float] = []
    lengths: list[float] = []
    truncated: list[float] = []
    examples: list[dict] = []
    n_prompts = 0
    eos = tokenizer.eos_token_id
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        rollout = generate(
            policy, ids, mask, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, num_samples=sampling.num_samples,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, generator=gen,
            cache_implementation=sampling.cache_implementation, cuda_graphs=sampling.cuda_graphs,
            torch_compile=sampling.torch_compile, decode_attention=sampling.decode_attention,
        )
        n_prompts += ids.shape[0]
        rows = rollout.prompt_index.tolist()
        prompts = [batch["prompt"][i] for i in rows]
        extra = [batch["extra"][i] for i in rows]
        completions = rollout.decode_responses(tokenizer)
        columns = {k: [e.get(k) for e in extra] for k in (extra[0] if extra else {})}
        batch_scores = {}
        for name, fn in gold_fns.items():
            vals = fn(prompts=prompts, completions=completions, **columns)
            batch_scores[name] = vals
            scores[name].extend(float(v) for v in vals if v is not None)
        if reward_model is not None:
            rm_scores, _ = RewardModelScorer(reward_model)(rollout, prompts, completions, extra)
            proxy.extend(rm_scores.float().cpu().tolist())
        if reference is not None:
            logp = rollout.logprobs if sampling.temperature == 1.0 else rollout.response_logprobs(policy)[0]
            ref_logp, _ = rollout.response_logprobs(reference)
            kls.extend(((logp - ref_logp) * rollout.response_mask).sum(-1).cpu().tolist())
        lengths.extend(rollout.response_lengths.float().cpu().tolist())
        truncated.extend((~rollout.finished).float().cpu().tolist())
        for j in range(len(completions)):
            if len(examples) >= n_examples:
                break
            if j % sampling.num_samples == 0:  # first sample of each prompt
                examples.append({"prompt": batch["prompt_text"][rows[j]], "response": completions[j],
                                 **{k: batch_scores[k][j] for k in batch_scores}})
    out: dict[str, Any] = {}
    for i, (name, vals) in enumerate(scores.items()):
        if i == 0:
            out["gold_reward"] = _mean_std(vals)
        out[f"gold/{name}"] = _mean_std(vals)
    if reward_model is not None:
        out["proxy_reward"] = _mean_std(proxy)
    if reference is not None:
        out["kl_to_ref"] = sum(kls) / max(1, len(kls))
    out.update(
        response_len=sum(lengths) / max(1, len(lengths)),
        truncated_frac=sum(truncated) / max(1, len(truncated)),
        n_prompts=n_prompts,
        n_samples=len(lengths),
        sampling=asdict(sampling),
        examples=examples,
    )
    return out


@torch.no_grad()
def completion_loss(model: torch.nn.Module, tokenizer, files: str | list[str], *, batch_size: int = 64, max_length: int = 512) -> float:
    """Token-mean cross-entropy of ``model`` on the completions of SFT records in ``files``."""
    dm = RLHFDataModule(train_files=files, kind="sft", tokenizer=tokenizer, batch_size=batch_size,
                        max_length=max_length, shuffle=False)
    dm.setup("fit")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in dm.train_dataloader():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        total += float(sft_loss(logits, batch["input_ids"], batch["loss_mask"], reduction="sum"))
        count += int(batch["loss_mask"].sum())
    model.train(was_training)
    return total / max(1, count)


class PolicyEvaluation(Callback):
    """Evaluate the policy before and after ``fit`` on held-out data; print both and write JSON.

    Measures the held-out completion loss (``loss_files``, SFT records) and the gold reward of
    sampled responses to held-out prompts (``prompt_files``, scored by ``gold`` functions given by
    import path), so a run shows in numbers what training changed.

    Args:
        prompt_files: held-out prompt records.
        gold: reward functions by import path (TRL signature), the first one reported as ``gold_reward``.
        loss_files: held-out SFT records for the completion loss (optional).
        output: JSON file for ``{"before": {...}, "after": {...}}`` (default: ``<output_dir>/eval.json``
            of the module, if it has one).
        sampling: sampling settings.
        max_prompts: evaluate on the first N prompts only.
    """

    def __init__(
        self,
        prompt_files: str | list[str],
        gold: list[str],
        loss_files: str | list[str] | None = None,
        output: str | None = None,
        sampling: SamplingSpec | None = None,
        max_prompts: int | None = None,
    ):
        self.prompt_files = prompt_files
        self.gold = gold
        self.loss_files = loss_files
        self.output = output
        self.sampling = sampling or SamplingSpec()
        self.max_prompts = max_prompts
        self.results: dict[str, dict] = {}

    def _evaluate(self, pl_module) -> dict:
        model = pl_module.exported_model()
        res = evaluate_policy(
            model, pl_module.tokenizer, self.prompt_files, gold=self.gold, sampling=self.sampling,
            max_prompts=self.max_prompts,
        )
        if self.loss_files:
            res["completion_loss"] = completion_loss(model, pl_module.tokenizer, self.loss_files)
        return res

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.results["before"] = self._evaluate(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.results["after"] = self._evaluate(pl_module)
        rows = [("", "before", "after")]
        for key in ("completion_loss", "gold_reward", "response_len"):
            if key in self.results["after"]:
                b, a = self.results["before"][key], self.results["after"][key]
                fmt = (lambda v: f"{v['mean']:+.3f} ± {v['std']:.3f}") if isinstance(a, dict) else (lambda v: f"{v:.3f}")
                rows.append((key, fmt(b), fmt(a)))
        n = self.results["after"]
        table = "\n".join(f"  {r[0]:<16} {r[1]:>18} {r[2]:>18}" for r in rows)
        rank_zero_info(f"Held-out evaluation ({n['n_prompts']} prompts x {self.sampling.num_samples} samples):\n{table}")
        output = self.output or (str(Path(pl_module.output_dir) / "eval.json") if getattr(pl_module, "output_dir", None) else None)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(self.results, indent=2))
            rank_zero_info(f"wrote {output}")



def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their average rank)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman: need two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # average rank of the tie group, 1-based
        i = j + 1
    return ranks
