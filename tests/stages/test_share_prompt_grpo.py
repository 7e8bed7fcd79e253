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

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec
from lightning_rlhf.stages import GenerationSpec, GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) + 0.1 * len(c.split()) for c in completions]


GREAT = f"{__name__}.great"


class GRPO(GRPOModule):
    def eos_token_ids(self):  # a third of the vocabulary ends a response: ragged responses
        return sorted(set(super().eos_token_ids()) | set(range(0, len(self.tokenizer), 3)))


@pytest.fixture(scope="module")
def ragged_prompts(tmp_path_factory, write_jsonl):
    words = "the movie was great and the plot was fun but the end was slow".split()
    recs = [{"prompt": " ".join(words[i % 3 : 2 + 3 * (i % 4)])} for i in range(4)]  # 2 to 11 words
    return write_jsonl(tmp_path_factory.mktemp("ragged") / "prompts.jsonl", recs)


def run(module, prompts) -> dict:
    """Fit two rollout steps; each step's rollout and statistics, the final weights, and the rows /
    mask ranks of the policy's forwards."""
    seen: dict = {"rollouts": [], "stats": [], "forwards": []}
    generate, optimise = module.generate, module.optimise

    def gen(batch):
        seen["rollouts"].append(generate(batch))
        return seen["rollouts"][-1]

    def opt(*a, **kw):
        seen["stats"].append(optimise(*a, **kw))
        return seen["stats"][-1]

    module.generate, module.optimise = gen, opt

    class Spy(L.Callback):
        def on_fit_start(self, trainer, module):
            module.policy.register_forward_pre_hook(
                lambda _m, _a, kw: seen["forwards"].append((kw["input_ids"].shape, kw["attention_mask"].dim())),
                with_kwargs=True,
            )

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Spy()],
    )  # fmt: skip
    dm = RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=2, shuffle=False)
    trainer.fit(module, datamodule=dm)
    seen["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return seen


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
