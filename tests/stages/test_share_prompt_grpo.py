"""share_prompt in the GRPO stage: a fit (beta > 0, two iterations of shuffled mini-batches, old
log-probs, reference forward, training forward) gives the same per-step statistics and final weights
with and without one shared row per prompt group; also with a LoRA policy (adapter-off reference)
and with padding_free. PPO refuses the option.

Real ``lightning.Trainer.fit`` runs of two rollout steps on the tiny Llama, fp32 on the CPU; ragged
prompts and responses cut short by EOS.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from online_fits import GREAT, EarlyEos, fit_two_rollouts
from online_fits import ragged_prompts as ragged_prompt_file

from lightning_rlhf.models import LoraSpec, ModelSpec
from lightning_rlhf.stages import GenerationSpec, GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


class GRPO(EarlyEos, GRPOModule):
    pass


@pytest.fixture(scope="module")
def ragged_prompts(tmp_path_factory, write_jsonl):
    return ragged_prompt_file(write_jsonl, tmp_path_factory.mktemp("ragged"), 4)


def run(module, prompts) -> dict:
    """Fit two rollout steps, recording the rows / mask ranks of the policy's forwards."""

    def record(seen, kw):
        seen.setdefault("forwards", []).append((kw["input_ids"].shape, kw["attention_mask"].dim()))

    return fit_two_rollouts(module, prompts, batch_size=2, on_forward=record)


def grpo(model_dir, lora: bool = False, **kw) -> GRPO:
    L.seed_everything(0)
    policy = ModelSpec(path=str(model_dir), lora=LoraSpec(r=4, alpha=8) if lora else None)
    return GRPO(
        policy=policy, reward_functions=[GREAT], num_generations=3, beta=0.1, num_iterations=2,
        mini_batch_size=4, micro_batch_size=4, generation=GenerationSpec(max_new_tokens=8),
        optim=OptimSpec(learning_rate=1e-3, scheduler="constant"), log_samples_every_n_steps=0, **kw,
    )  # fmt: skip


def assert_same_runs(a: dict, b: dict) -> None:
    for ra, rb in zip(a["rollouts"], b["rollouts"], strict=True):
        assert torch.equal(ra.response_ids, rb.response_ids)  # the same samples
    lengths = torch.cat([r.response_mask.sum(-1) for r in a["rollouts"]])
    assert len(set(lengths.tolist())) > 2  # ragged responses
    assert len(a["stats"]) == len(b["stats"]) == 2
    for sa, sb in zip(a["stats"], b["stats"], strict=True):
        assert sa.keys() == sb.keys() and "train/kl_loss" in sa and "train/policy_loss" in sa
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], abs=1e-5, nan_ok=True), k
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0, msg=k)
    # the policy trained: equal weights are not both untouched
    assert any(not torch.equal(a["initial"][k], a["weights"][k]) for k in a["initial"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora", "padding_free"])
def test_grpo_fit_with_share_prompt_equals_separate_rows(tiny_model_dir, ragged_prompts, variant):
    runs = []
    for share in (False, True):
        kw = {"padding_free": True} if variant == "padding_free" else {}
        m = grpo(tiny_model_dir, lora=variant == "lora", share_prompt=share, **kw)
        m.configure_model()
        initial = {k: v.detach().clone() for k, v in m.state_dict().items()}
        runs.append(run(m, ragged_prompts))
        runs[-1]["initial"] = initial
    assert_same_runs(*runs)
    # the shared run scored rows in shared rows (4D masks, fewer rows than the micro-batch) ...
    shared = [shape for shape, dims in runs[1]["forwards"] if dims == 4 and shape[0] < 4]
    assert shared
    # ... and, without padding_free, the separate run never used a 4D mask (generation: 2D)
    if variant != "padding_free":
        assert {dims for _, dims in runs[0]["forwards"]} == {2}


def test_ppo_refuses_share_prompt(tiny_model_dir):
    with pytest.raises(ValueError, match="PPOModule: share_prompt is for GRPO/RLOO"):
        PPOModule(policy=str(tiny_model_dir), reward_functions=[GREAT], share_prompt=True)
