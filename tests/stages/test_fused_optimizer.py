"""Every stage's AdamW is torch's fused kernel (fewer passes over the parameters): the same update as
the default implementation, and off under mixed precision, where the Trainer clips no fused optimiser."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.rollout import GenerationSpec
from lightning_rlhf.stages import PPOModule, RewardModule
from lightning_rlhf.stages.common import OptimSpec, build_optimizer


def test_fused_adamw_makes_the_default_update():
    torch.manual_seed(0)
    spec = OptimSpec(learning_rate=1e-2, weight_decay=0.1)
    params = {k: [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))] for k in ("a", "b")}
    params["b"] = [torch.nn.Parameter(p.detach().clone()) for p in params["a"]]
    fused, plain = build_optimizer(params["a"], spec, fused=True), build_optimizer(params["b"], spec)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(3):
        grads = [torch.randn_like(p) for p in params["a"]]
        for opt, ps in ((fused, params["a"]), (plain, params["b"])):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        for p, q in zip(params["a"], params["b"], strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=f"step {step}")


def _fit(module, pref_file, **kw) -> L.Trainer:
    t = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)  # fmt: skip
    t.fit(module, RLHFDataModule(str(pref_file), batch_size=2, shuffle=False, max_length=48, max_prompt_length=16))
    return t


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory, write_jsonl):
    recs = [{"prompt": f"review the {p} .", "chosen": f" the {p} is good .", "rejected": f" the {p} is bad ."}
            for p in ("phone", "lamp", "chair", "bag")]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("fused") / "pairs.jsonl", recs)


def test_offline_stage_uses_fused_adamw_except_under_mixed_precision(rm_dir, pref_file):
    opt = OptimSpec(learning_rate=1e-3, max_grad_norm=1.0)
    t = _fit(RewardModule(str(rm_dir), optim=opt), pref_file)
    assert t.optimizers[0].defaults["fused"]
    # Lightning's MixedPrecision plugin refuses to clip a fused optimiser, with or without a GradScaler
    for kw in ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]},
               {"precision": "bf16-mixed"}):  # fmt: skip
        t = _fit(RewardModule(str(rm_dir), optim=opt), pref_file, **kw)  # clips every step
        assert not t.optimizers[0].defaults["fused"]
        assert t.global_step == 2


def great_fraction(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


def test_online_stage_uses_fused_adamw_for_actor_and_critic_except_under_mixed_precision(
    tiny_model_dir, prompt_file
):
    def fit(**kw) -> tuple[L.Trainer, PPOModule]:
        opt = OptimSpec(learning_rate=1e-3, max_grad_norm=0.5, scheduler="constant")
        module = PPOModule(policy=str(tiny_model_dir), reward_functions=[great_fraction], critic_init="policy",
                           optim=opt, critic_optim=opt, generation=GenerationSpec(max_new_tokens=4),
                           ppo_epochs=1, log_samples_every_n_steps=0)  # fmt: skip
        t = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)  # fmt: skip
        t.fit(module, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
        assert module._policy_version == 1  # one actor step, clipped
        return t, module

    t, _ = fit()
    assert [o.defaults["fused"] for o in t.optimizers] == [True, True]  # actor, critic
    t, _ = fit(precision="bf16-mixed")  # the Trainer clips the (unfused) optimisers
    assert not any(o.defaults["fused"] for o in t.optimizers)
