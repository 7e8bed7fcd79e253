"""Scorers: turn a `Rollout` (and its text) into one scalar reward per row.

Every scorer is called the same way,

    rewards, parts = scorer(rollout, prompts, completions, extra)

with `prompts`, `completions` and `extra` (the dataset's other columns, a dict per row) given per
rollout row (the rows of one prompt repeat its prompt and columns), and returns `rewards (N,)` fp32
plus `parts`, a dict `{name: (N,)}` of the components for logging (`rollout/reward/<name>`).

What the online stages keep of a scoring call lives here too: `Scores` (shaped and raw rewards, parts,
diagnostics and texts of each row) and `RunningMoments` (the running reward normaliser).
"""

from __future__ import annotations

import importlib
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lightning_rlhf.core.packing import unpack
from lightning_rlhf.errors import RewardFunctionError
from lightning_rlhf.models.forward import default_position_ids, packed_forward
from lightning_rlhf.rollout.generate import Rollout, _hf_model, eval_mode

ScoreOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


class Scorer(Protocol):
    def __call__(
        self, rollout: Rollout, prompts: list, completions: list[str], extra: list[dict]
    ) -> ScoreOutput: ...


def _check_rows(name: str, rollout: Rollout, prompts: list, completions: list[str], extra: list[dict]) -> int:
    n = len(rollout)
    if not len(prompts) == len(completions) == len(extra) == n:
        raise ValueError(
            f"{name}: got {len(prompts)} prompts, {len(completions)} completions and {len(extra)} extra "
            f"dicts for a rollout of {n} rows; pass one of each per rollout row"
        )
    return n


# --------------------------------------------------------------------------------------------------
# Reward model


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    hf = _hf_model(model)
    for attr in ("score", "classifier"):
        head = getattr(hf, attr, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(
        f"last_token_scores: {type(hf).__name__} has no `score` (or `classifier`) head; expected an "
        "AutoModelForSequenceClassification of a decoder model"
    )


def last_token_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar score of each sequence, read at its last real token: `(B, T)` -> `(B,)` fp32.

    With `index` `(B, K)` long, the scores are read at those positions instead, `(B, K)` fp32
    (several sequences in one row, e.g. the reward model's shared-prompt pairs); `attention_mask`
    may then be any mask the model takes, such as a 4D one (pass `position_ids` with it).

    `model` is a one-label `AutoModelForSequenceClassification` (or a peft wrapper of one). The last
    real token is found from `attention_mask` (any padding layout), never from pad ids:
    transformers' own pooling looks for the last token != pad_token_id, which is wrong when pad ==
    eos. We call the whole model (so FSDP / peft wrappers run their hooks) and gather from the
    per-token output of its `score` head, caught with a forward hook.

    Keeps gradients (the reward-model stage trains through it); wrap in `torch.no_grad()` to score.
    """
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    batch, length = input_ids.shape
    if index is None:  # (B, 1) index of the last real token
        last = (length - 1 - attention_mask.long().flip(-1).argmax(-1))[:, None]
    else:
        last = index
    head = _score_head(model)
    hf = _hf_model(model)
    pad_id = getattr(hf.config.get_text_config(), "pad_token_id", None)
    if pad_id is None and batch > 1:
        # transformers' pooling refuses batches without a pad id; run backbone + head ourselves
        hidden = hf.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        per_token = head(hidden[torch.arange(batch, device=hidden.device)[:, None], last])  # (B, K, L)
    else:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        finally:
            hook.remove()
        per_token = captured[-1]  # (B, T, L)
        per_token = per_token[
            torch.arange(batch, device=per_token.device)[:, None], last.to(per_token.device)
        ]  # (B, K, L)
    if per_token.shape[-1] != 1:
        raise ValueError(f"last_token_scores: the reward model has {per_token.shape[-1]} labels, expected 1")
    scores = per_token[..., 0].float()  # (B, K)
    return scores[:, 0] if index is None else scores


def packed_scores(model: torch.nn.Module, packed: tuple, index: torch.Tensor) -> torch.Tensor:
    """``last_token_scores`` read at ``index`` ``(B, K)`` (columns of the original rows, each a kept
    token of the packing) from one forward of the packed rows (``packed``: ``(packing, kwargs)`` of
    ``models.forward.packed_forward``, whose kept tokens end each packed row): ``(B, K)`` fp32."""
    packing, kwargs = packed
    rows, width = packing.input_ids.shape
    cols = torch.arange(width - packing.keep, width, device=index.device).expand(rows, -1)  # (B', keep)
    per_token = last_token_scores(
        model, kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"], index=cols
    )  # (B', keep)
    return unpack(per_token, packing).gather(1, index)


class RewardModelScorer:
    """Score prompt+response ids with a sequence classifier sharing the policy's tokenizer.

    Args:
        model: one-label `AutoModelForSequenceClassification` (frozen; run in eval mode, no grad).
        batch_size: rows per forward (None = all rows at once).
        name: key of its scores in the parts dict.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int | None = None,
        name: str = "reward_model",
        padding_free: bool = False,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"RewardModelScorer: batch_size must be >= 1 or None, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.name = name
        self.padding_free = padding_free

    def _scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``(n,)`` scores at each row's last real token; with ``padding_free`` from packed rows
        (``models.forward.packed_forward``, the padded rows when packing saves nothing)."""
        if self.padding_free:
            length = input_ids.shape[1]
            last = length - 1 - attention_mask.long().flip(-1).argmax(-1)  # (n,)
            keep = torch.zeros_like(attention_mask, dtype=torch.bool).scatter_(1, last[:, None], True)
            packed = packed_forward(self.model, input_ids, attention_mask, position_ids, keep=keep)
            if packed is not None:
                return packed_scores(self.model, packed, last[:, None])[:, 0]
        return last_token_scores(self.model, input_ids, attention_mask, position_ids)

    def __call__(
        self,
        rollout: Rollout,
        prompts: list | None = None,
        completions: list[str] | None = None,
        extra: list[dict] | None = None,
    ) -> ScoreOutput:
        """Scores from the ids alone; the text arguments are accepted for the common signature."""
        input_ids, attention_mask, position_ids = rollout.sequences()  # (N, P+R)
        n = input_ids.shape[0]
        step = self.batch_size or n
        with torch.no_grad(), eval_mode(self.model):
            scores = torch.cat(
                [
                    self._scores(input_ids[i : i + step], attention_mask[i : i + step], position_ids[i : i + step])
                    for i in range(0, n, step)
                ]
            )  # (N,) fp32
        return scores, {self.name: scores}


# --------------------------------------------------------------------------------------------------
# Reward functions


def import_function(path: str) -> Callable:
    """`"pkg.module.func"` (or `"pkg.module:func"`) -> the function."""
    module_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r}: expected an import path 'pkg.module.func'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _qualified_name(fn: Callable) -> str:
    """``pkg.module.func`` of a function (what a YAML names it by)."""
    module = getattr(fn, "__module__", None)
    return f"{module}.{_function_name(fn)}" if module else _function_name(fn)


def _to_values(name: str, out: Any, n: int, batch: str = "") -> list[float | None]:
    """Validate a reward function's output: n finite numbers or None."""
    at = f" ({batch})" if batch else ""
    if isinstance(out, torch.Tensor):
        out = out.detach().flatten().tolist()
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(out).__name__}; expected a list of {n} floats{at}"
        )
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(out)} values for {n} completions{at}")
    values = []
    for i, v in enumerate(out):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} ({type(v).__name__}) at position {i}; "
                f"expected a float or None{at}"
            )
        if v is not None and not math.isfinite(v):
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} at position {i}; expected a finite float "
                f"(None marks a completion it does not apply to){at}"
            )
        values.append(None if v is None else float(v))
    return values


class RewardFunctionScorer:
    """Weighted sum of Python reward functions, TRL-style.

    Each function is called as `fn(prompts=list, completions=list[str], **columns)`, where `columns`
    are the extra dataset columns as lists (one entry per rollout row, None where a row lacks it), and
    returns one float or None per completion. None means "not applicable": it contributes 0 to the
    reward and shows as NaN in that function's entry of the parts dict (log it with `nanmean`).

    Args:
        functions: callables, or import paths `"pkg.module.func"`.
        weights: one per function (default all 1).
    """

    def __init__(self, functions: Sequence[Callable | str], weights: Sequence[float] | None = None):
        if not functions:
            raise ValueError("RewardFunctionScorer: give at least one reward function")
        self.functions = [import_function(f) if isinstance(f, str) else f for f in functions]
        for f, fn in zip(functions, self.functions, strict=True):
            if not callable(fn):
                raise ValueError(f"RewardFunctionScorer: {f!r} is not callable")
        if weights is None:
            weights = [1.0] * len(self.functions)
        if len(weights) != len(self.functions):
            raise ValueError(
                f"RewardFunctionScorer: {len(weights)} weights for {len(self.functions)} reward functions"
            )
        self.weights = [float(w) for w in weights]
        names = [_function_name(fn) for fn in self.functions]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.calls = 0  # scoring calls so far, to name the batch in an error

    def __call__(
        self, rollout: Rollout, prompts: list, completions: list[str], extra: list[dict]
    ) -> ScoreOutput:
        n = _check_rows("RewardFunctionScorer", rollout, prompts, completions, extra)
        keys = list(dict.fromkeys(k for row in extra for k in row if k not in ("prompts", "completions")))
        columns = {k: [row.get(k) for row in extra] for k in keys}
        device = rollout.prompt_ids.device
        rewards = torch.zeros(n, dtype=torch.float32)
        parts, applicable = {}, torch.zeros(n, dtype=torch.bool)
        self.calls += 1
        batch = f"scoring call {self.calls}: {n} completions, first prompt {str(prompts[0])[:60]!r}" if n else ""
        for name, fn, weight in zip(self.names, self.functions, self.weights, strict=True):
            where = f"{_qualified_name(fn)}, {batch}"
            try:
                out = fn(prompts=list(prompts), completions=list(completions), **columns)
            except Exception as e:
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(e).__name__}: {e} ({where}; arguments: "
                    f"prompts, completions{''.join(', ' + k for k in columns)})"
                ) from e
            values = _to_values(name, out, n, where)
            part = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)  # (N,)
            applicable |= ~part.isnan()
            rewards += weight * part.nan_to_num(nan=0.0)
            parts[name] = part.to(device)
        if not bool(applicable.all()):
            rows = (~applicable).nonzero().flatten().tolist()
            warnings.warn(
                f"RewardFunctionScorer: every reward function returned None for rows {rows[:10]}"
                f"{' ...' if len(rows) > 10 else ''}; their reward is 0",
                stacklevel=2,
            )
        return rewards.to(device), parts


class CompositeScorer:
    """Weighted sum of scorers; parts are merged (a repeated name gets a `_<i>` suffix)."""

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float] | None = None):
        if not scorers:
            raise ValueError("CompositeScorer: give at least one scorer")
        if weights is None:
            weights = [1.0] * len(scorers)
        if len(weights) != len(scorers):
            raise ValueError(f"CompositeScorer: {len(weights)} weights for {len(scorers)} scorers")
        self.scorers = list(scorers)
        self.weights = [float(w) for w in weights]

    def __call__(
        self, rollout: Rollout, prompts: list, completions: list[str], extra: list[dict]
    ) -> ScoreOutput:
        _check_rows("CompositeScorer", rollout, prompts, completions, extra)
        total, parts = None, {}
        for i, (scorer, weight) in enumerate(zip(self.scorers, self.weights, strict=True)):
            rewards, sub = scorer(rollout, prompts, completions, extra)
            total = weight * rewards if total is None else total + weight * rewards
            for name, value in sub.items():
                parts[name if name not in parts else f"{name}_{i}"] = value
        return total, parts


# ------------------------------------------------------------------ what a stage keeps of scores


def build_scorer(
    reward_model: torch.nn.Module | None,
    reward_functions: Sequence[Callable | str] = (),
    weights: Sequence[float] | None = None,
    batch_size: int | None = None,
    padding_free: bool = False,
) -> CompositeScorer:
    """The scorer of the online stages: the reward model (if any) and the reward functions, weighted.

    ``weights``: one per source, the reward model first (if any), then each function; None: all 1.
    ``batch_size``: rows per reward-model forward (None: all at once).
    ``padding_free``: the reward model's forwards on packed rows (``RewardModelScorer``).
    """
    n_sources = (reward_model is not None) + len(reward_functions)
    weights = list(weights or [1.0] * n_sources)
    scorers, scorer_weights = [], []
    if reward_model is not None:
        scorers.append(RewardModelScorer(reward_model, batch_size=batch_size, padding_free=padding_free))
        scorer_weights.append(weights.pop(0))
    if reward_functions:  # the remaining weights are the functions'
        scorers.append(RewardFunctionScorer(list(reward_functions), weights))
        scorer_weights.append(1.0)
    return CompositeScorer(scorers, scorer_weights)


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (Chan et al.'s parallel update).

    Used to normalise rewards across steps; its state goes into the checkpoint.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = float(x.numel())
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class Scores:
    """What ``OnlineRLModule.score`` returns for a rollout of N rows."""

    rewards: torch.Tensor
    """``(N,)`` fp32, what the optimiser sees: raw score, minus the missing-EOS penalty, then
    running-normalised and clipped as configured."""
    raw: torch.Tensor
    """``(N,)`` fp32, the scorer's output before any shaping."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """``{name: (N,)}``: each reward source (reward model, each function); NaN where not applicable."""
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    """``{name: (N,)}``: the ``diagnostic_functions`` (logged, never optimised)."""
    prompts: list = field(default_factory=list)
    """The raw prompt of each row (str or messages)."""
    completions: list[str] = field(default_factory=list)
    """The decoded response of each row."""

    def select(self, rows: torch.Tensor) -> Scores:
        """The scores of rollout rows ``rows`` (a long tensor), as ``Rollout.select``."""
        r = rows.tolist()
        return Scores(
            rewards=self.rewards[rows.to(self.rewards.device)],
            raw=self.raw[rows.to(self.raw.device)],
            parts={k: v[rows.to(v.device)] for k, v in self.parts.items()},
            diagnostics={k: v[rows.to(v.device)] for k, v in self.diagnostics.items()},
            prompts=[self.prompts[i] for i in r],
            completions=[self.completions[i] for i in r],
        )

    @classmethod
    def cat(cls, scores: Sequence[Scores]) -> Scores:
        """Rows of several ``Scores`` one after the other (same keys in each), as ``Rollout.cat``."""
        return cls(
            rewards=torch.cat([s.rewards for s in scores]),
            raw=torch.cat([s.raw for s in scores]),
            parts={k: torch.cat([s.parts[k] for s in scores]) for k in scores[0].parts},
            diagnostics={k: torch.cat([s.diagnostics[k] for s in scores]) for k in scores[0].diagnostics},
            prompts=[p for s in scores for p in s.prompts],
            completions=[c for s in scores for c in s.completions],
        )
