"""micro_batch_tokens: with micro_batch_size / forward_batch_size unset, the online stages split a
rollout into forwards of at most that many padded tokens, and a fit gives the same statistics and
weights as one forward of every row.

Real ``lightning.Trainer.fit`` runs of two rollout steps on the tiny Llama, fp32 on the CPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from online_fits import GREAT, EarlyEos, fit_two_rollouts
from online_fits import ragged_prompts as ragged_prompt_file

from lightning_rlhf.rollout import Rollout
from lightning_rlhf.stages import GenerationSpec, GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


class GRPO(EarlyEos, GRPOModule):
    pass


class PPO(EarlyEos, PPOModule):
    pass


def rollout(rows: int, prompt_cols: int, response_cols: int) -> Rollout:
    ones = torch.ones(rows, prompt_cols, dtype=torch.long), torch.ones(rows, response_cols, dtype=torch.long)
    return Rollout(prompt_ids=ones[0], prompt_mask=ones[0], response_ids=ones[1], response_mask=ones[1],
                   logprobs=torch.zeros(rows, response_cols), finished=torch.ones(rows, dtype=torch.bool),
                   prompt_index=torch.arange(rows))  # fmt: skip


def test_rows_per_forward_fills_the_token_budget(tiny_model_dir):
    m = GRPOModule(policy=str(tiny_model_dir), reward_functions=[GREAT], micro_batch_tokens=100)
    assert m.rows_per_forward(None, rollout(64, 12, 8)) == 5  # 100 // 20 columns
    assert m.rows_per_forward(None, rollout(64, 90, 30)) == 1  # a row wider than the budget: one row
    assert m.rows_per_forward(7, rollout(64, 12, 8)) == 7  # rows given: as given
    m.micro_batch_tokens = None
    assert m.rows_per_forward(None, rollout(64, 12, 8)) == 64  # no budget: every row


def test_micro_batch_tokens_must_be_positive(tiny_model_dir):
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1 or None"):
        GRPOModule(policy=str(tiny_model_dir), reward_functions=[GREAT], micro_batch_tokens=0)


@pytest.fixture(scope="module")
def ragged_prompts(tmp_path_factory, write_jsonl):
    return ragged_prompt_file(write_jsonl, tmp_path_factory.mktemp("ragged"), 4)


def rows_seen(seen, kw):  # rows of each scoring / training forward (not the sampler's: it uses a cache)
    if kw.get("use_cache") is False:
        seen.setdefault("shapes", []).append(tuple(kw["input_ids"].shape))


def assert_same_fits(a: dict, b: dict) -> None:
    """The same samples at both steps (the second step's depend on the first step's weights) and the
    same final weights. The logged statistics are means over micro-batches, so they depend on the
    split: only their names are compared."""
    for ra, rb in zip(a["rollouts"], b["rollouts"], strict=True):
        assert torch.equal(ra.response_ids, rb.response_ids)
    for sa, sb in zip(a["stats"], b["stats"], strict=True):
        sa, sb = (sa[0], sb[0]) if isinstance(sa, tuple) else (sa, sb)
        assert sa.keys() == sb.keys() and any("loss" in k for k in sa)
    moved = 0
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0, msg=k)
        moved += not torch.equal(a["weights"][k], a["initial"][k])
    assert moved  # the fits trained


@pytest.mark.parametrize(("stage", "tokens"), [("grpo", 40), ("ppo", 16)])  # rollouts of 6 / 2 rows
def test_fit_in_token_budgeted_forwards_equals_one_forward(tiny_model_dir, ragged_prompts, stage, tokens):
    runs = []
    for budget in (None, tokens):
        L.seed_everything(0)
        common = dict(policy=str(tiny_model_dir), reward_functions=[GREAT], micro_batch_tokens=budget,
                      generation=GenerationSpec(max_new_tokens=8), log_samples_every_n_steps=0,
                      optim=OptimSpec(learning_rate=1e-3, scheduler="constant"))  # fmt: skip
        if stage == "grpo":
            m = GRPO(num_generations=3, beta=0.1, num_iterations=2, **common)
        else:
            m = PPO(critic_init="policy", ppo_epochs=2, critic_optim=OptimSpec(learning_rate=1e-3), **common)
        m.configure_model()
        initial = {k: v.detach().clone() for k, v in m.state_dict().items()}
        runs.append(fit_two_rollouts(m, ragged_prompts, batch_size=2, on_forward=rows_seen) | {"initial": initial})
    whole, split = runs
    assert_same_fits(whole, split)
    rows = len(whole["rollouts"][0])
    assert max(r for r, _ in whole["shapes"]) == rows  # no budget: forwards of the whole rollout ...
    # ... with a budget: forwards of at most that many padded tokens, more of them
    assert max(r * c for r, c in whole["shapes"]) > tokens >= max(r * c for r, c in split["shapes"])
    assert len(split["shapes"]) > len(whole["shapes"])
