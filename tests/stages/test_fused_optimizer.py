"""Every stage's AdamW is torch's fused kernel (fewer passes over the parameters): the same update as
the default implementation; under bf16-mixed too (the stage clips by itself, where Lightning's plugin
refuses a fused optimiser), and off under 16-mixed (a GradScaler, unscaled only inside a fused step)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from transformers import AutoModelForSequenceClassification

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


def test_offline_stage_uses_fused_adamw_except_under_a_grad_scaler(rm_dir, pref_file):
    opt = OptimSpec(learning_rate=1e-3, max_grad_norm=1.0)
    for kw in ({}, {"precision": "bf16-mixed"}):
        t = _fit(RewardModule(str(rm_dir), optim=opt), pref_file, **kw)
        assert t.optimizers[0].defaults["fused"], kw
        assert t.global_step == 2
    # a GradScaler (16-mixed): gradients must be unscaled before clipping, which a fused step does only inside
    kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    t = _fit(RewardModule(str(rm_dir), optim=opt), pref_file, **kw)  # clips every step
    assert not t.optimizers[0].defaults["fused"]
    assert t.global_step == 2


class _NormsRecorded(RewardModule):
    """Records the gradients' total norm before and after the stage's clipping."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        before = float(torch.nn.utils.get_total_norm(grads))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms.append((before, float(torch.nn.utils.get_total_norm(grads))))


def test_bf16_mixed_fused_adamw_clips_and_equals_the_for_loop_update(rm_dir, pref_file, monkeypatch):
    max_norm = 1e-3  # far below the reward model's first gradients: every step is clipped
    results = {}
    for variant in ("fused", "for-loop"):
        if variant == "for-loop":  # the for-loop AdamW, clipped by Lightning's own plugin (today's path)
            monkeypatch.setattr(RewardModule, "_fused_adamw_ok", lambda self: False)
        torch.manual_seed(0)
        module = _NormsRecorded(str(rm_dir), optim=OptimSpec(learning_rate=1e-2, max_grad_norm=max_norm))
        module.norms = []
        t = _fit(module, pref_file, precision="bf16-mixed")
        assert bool(t.optimizers[0].defaults["fused"]) == (variant == "fused")
        results[variant] = (module.norms, {k: v.detach().clone() for k, v in module.model.state_dict().items()})
        monkeypatch.undo()
    for variant, (norms, _) in results.items():
        assert len(norms) == 2, variant
        for before, after in norms:
            assert before > 10 * max_norm
            assert after == pytest.approx(max_norm, rel=1e-4), variant
    (n_a, w_a), (n_b, w_b) = results.values()
    assert [b for b, _ in n_a] == pytest.approx([b for b, _ in n_b], rel=1e-5)  # same gradients before each update
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], atol=1e-6, rtol=0, msg=k)
    init = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).state_dict()
    assert any(not torch.equal(w_a[k], init[k]) for k in w_a)  # the updates did move the weights


def great_fraction(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


def test_online_stage_uses_fused_adamw_for_actor_and_critic_except_under_a_grad_scaler(
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
    t, _ = fit(precision="bf16-mixed")  # fused, clipped by the stage itself
    assert [o.defaults["fused"] for o in t.optimizers] == [True, True]
    t, _ = fit(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    assert not any(o.defaults["fused"] for o in t.optimizers)  # a GradScaler: the for-loop AdamW
