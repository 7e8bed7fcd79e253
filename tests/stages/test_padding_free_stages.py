"""padding_free in the online stages: a GRPO and a PPO fit (ragged prompts, responses cut short by EOS)
give the same losses and weights with and without packing; unsupported attention is refused.

Real ``lightning.Trainer.fit`` runs of two rollout steps on the tiny Llama, fp32 on the CPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import ModelSpec
from lightning_rlhf.stages import GenerationSpec, GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) + 0.1 * len(c.split()) for c in completions]


GREAT = f"{__name__}.great"


class EarlyEos:
    """A third of the vocabulary ends a response: rows stop after different numbers of tokens."""

    def eos_token_ids(self):
        return sorted(set(super().eos_token_ids()) | set(range(0, len(self.tokenizer), 3)))


class GRPO(EarlyEos, GRPOModule):
    pass


class PPO(EarlyEos, PPOModule):
    pass


@pytest.fixture(scope="module")
def ragged_prompts(tmp_path_factory, write_jsonl):
    words = "the movie was great and the plot was fun but the end was slow".split()
    recs = [{"prompt": " ".join(words[i % 3 : 2 + 3 * (i % 4)])} for i in range(8)]  # 2 to 11 words
    return write_jsonl(tmp_path_factory.mktemp("ragged") / "prompts.jsonl", recs)


def run(module, prompts) -> dict:
    """Fit two rollout steps; return each step's rollout, training statistics and the final weights."""
    seen: dict = {"rollouts": [], "stats": []}
    generate, optimise = module.generate, module.optimise

    def gen(batch):
        seen["rollouts"].append(generate(batch))
        return seen["rollouts"][-1]

    def opt(*a, **kw):
        seen["stats"].append(optimise(*a, **kw))
        return seen["stats"][-1]

    module.generate, module.optimise = gen, opt

    class MaskSpy(L.Callback):  # the attention masks the policy's forwards get: 4D when packed
        def on_fit_start(self, trainer, module):
            module.policy.register_forward_pre_hook(
                lambda _m, _a, kw: seen.setdefault("mask_dims", set()).add(kw["attention_mask"].dim()), with_kwargs=True
            )

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[MaskSpy()],
    )  # fmt: skip
    dm = RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=4, shuffle=False)
    trainer.fit(module, datamodule=dm)
    seen["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return seen


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
