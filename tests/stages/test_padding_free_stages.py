"""padding_free in the online stages: a GRPO and a PPO fit (ragged prompts, responses cut short by EOS)
give the same losses and weights with and without packing; unsupported attention is refused.

Real ``lightning.Trainer.fit`` runs of two rollout steps on the tiny Llama, fp32 on the CPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from online_fits import GREAT, EarlyEos, fit_two_rollouts
from online_fits import ragged_prompts as ragged_prompt_file

from lightning_rlhf.models import ModelSpec
from lightning_rlhf.stages import GenerationSpec, GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


class GRPO(EarlyEos, GRPOModule):
    pass


class PPO(EarlyEos, PPOModule):
    pass


@pytest.fixture(scope="module")
def ragged_prompts(tmp_path_factory, write_jsonl):
    return ragged_prompt_file(write_jsonl, tmp_path_factory.mktemp("ragged"), 8)


def run(module, prompts) -> dict:
    """Fit two rollout steps, recording the ranks of the policy's attention masks (4D when packed)."""

    def record(seen, kw):
        seen.setdefault("mask_dims", set()).add(kw["attention_mask"].dim())

    return fit_two_rollouts(module, prompts, batch_size=4, on_forward=record)


def assert_same_runs(a: dict, b: dict) -> None:
    for ra, rb in zip(a["rollouts"], b["rollouts"], strict=True):
        assert torch.equal(ra.response_ids, rb.response_ids)  # the same samples...
    lengths = torch.cat([r.response_mask.sum(-1) for r in a["rollouts"]])
    prompts = torch.cat([r.prompt_mask.sum(-1) for r in a["rollouts"]])
    assert len(set(lengths.tolist())) > 2 and len(set(prompts.tolist())) > 2  # ...ragged on both sides
    assert len(a["stats"]) == len(b["stats"]) == 2
    for sa, sb in zip(a["stats"], b["stats"], strict=True):
        sa = sa[0] if isinstance(sa, tuple) else sa
        sb = sb[0] if isinstance(sb, tuple) else sb
        losses = [k for k in sa if "loss" in k]
        assert losses and sa.keys() == sb.keys()
        # value_clipfrac counts tokens where the clipped error exceeds the unclipped one; for a value that
        # moved less than the clip range, old + (v - old) is v up to rounding, so float noise of 1e-8
        # (any change of batch layout, packing or not) flips it: it alone is left out
        for k in (k for k in sa if k != "train/value_clipfrac"):
            assert sa[k] == pytest.approx(sb[k], abs=1e-5, nan_ok=True), k
    assert a["mask_dims"] == {2} and b["mask_dims"] == {2, 4}  # padded rows / packed rows (generation: 2D)
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0, msg=k)


def test_grpo_fit_with_padding_free_equals_padded(tiny_model_dir, ragged_prompts):
    runs = []
    for padding_free in (False, True):
        L.seed_everything(0)
        m = GRPO(
            policy=str(tiny_model_dir), reward_functions=[GREAT], num_generations=2, beta=0.1,
            num_iterations=2, mini_batch_size=4, micro_batch_size=4, forward_batch_size=4,
            generation=GenerationSpec(max_new_tokens=8), padding_free=padding_free,
            optim=OptimSpec(learning_rate=1e-3, scheduler="constant"), log_samples_every_n_steps=0,
        )  # fmt: skip
        runs.append(run(m, ragged_prompts))
    assert_same_runs(*runs)


@pytest.mark.parametrize("share_backbone", [False, True])
def test_ppo_fit_with_padding_free_equals_padded(tiny_model_dir, ragged_prompts, share_backbone):
    runs = []
    for padding_free in (False, True):
        L.seed_everything(0)
        m = PPO(
            policy=str(tiny_model_dir), reward_functions=[GREAT], critic_init="policy", share_backbone=share_backbone,
            ppo_epochs=2, mini_batch_size=4, micro_batch_size=2, generation=GenerationSpec(max_new_tokens=8),
            optim=OptimSpec(learning_rate=1e-3, scheduler="constant"),
            critic_optim=OptimSpec(learning_rate=1e-3, scheduler="constant"),
            padding_free=padding_free, log_samples_every_n_steps=0,
        )  # fmt: skip
        runs.append(run(m, ragged_prompts))
    assert_same_runs(*runs)


def test_attention_that_cannot_take_a_4d_mask_is_refused(tiny_model_dir):
    m = GRPOModule(
        policy=ModelSpec(path=str(tiny_model_dir), attn_implementation="flex_attention"),
        reward_functions=[GREAT], beta=0.0, padding_free=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="padding_free needs a 4D attention mask, but the policy.*flex_attention"):
        m.configure_model()
