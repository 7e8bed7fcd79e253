"""Precision: the frozen models follow ``*-true`` precision; ``16-mixed`` clips unscaled gradients."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.stages import DPOModule, GenerationSpec, PPOModule
from lightning_rlhf.stages.common import OptimSpec


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


def trainer(precision: str | None, callbacks=(), **kw) -> L.Trainer:
    if precision is not None:
        kw["precision"] = precision
    return L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=list(callbacks), **kw,
    )  # fmt: skip


def ppo(model_dir, rm_dir, **kw) -> PPOModule:
    kw.setdefault("optim", OptimSpec(learning_rate=1e-3, scheduler="constant"))
    return PPOModule(
        policy=str(model_dir), reward_model=str(rm_dir), generation=GenerationSpec(max_new_tokens=6),
        ppo_epochs=1, mini_batch_size=2, log_samples_every_n_steps=0, **kw,
    )  # fmt: skip


def test_bf16_true_converts_the_frozen_reference_and_reward_model(tiny_model_dir, rm_dir, prompt_file):
    m = ppo(tiny_model_dir, rm_dir)
    trainer("bf16-true").fit(m, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    assert next(m.policy.parameters()).dtype == torch.bfloat16  # Lightning converts the submodules
    assert next(m.reference.parameters()).dtype == torch.bfloat16  # and we the frozen ones, which are not
    assert next(m.reward_model.parameters()).dtype == torch.bfloat16


def test_32_true_leaves_the_frozen_models_in_their_dtype(tiny_model_dir, rm_dir, prompt_file):
    m = ppo(tiny_model_dir, rm_dir)
    trainer("32-true").fit(m, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    assert next(m.reference.parameters()).dtype == torch.float32


def test_dpo_reference_follows_bf16_true(tiny_model_dir, tmp_path, write_jsonl):
    pairs = [{"prompt": "review the phone .", "chosen": " great .", "rejected": " bad ."}] * 2
    m = DPOModule(str(tiny_model_dir), optim=OptimSpec(learning_rate=1e-3))
    trainer("bf16-true", max_steps=1).fit(
        m, RLHFDataModule(str(write_jsonl(tmp_path / "p.jsonl", pairs)), batch_size=2, max_length=32, max_prompt_length=16)
    )
    assert next(m.reference.parameters()).dtype == torch.bfloat16


class GradNorms(L.Callback):
    """The policy's gradient norm when the optimiser steps (after Lightning's unscale)."""

    def __init__(self):
        self.norms: list[float] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        if grads:
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_16_mixed_clips_the_unscaled_gradients(tiny_model_dir, rm_dir, prompt_file):
    """Lightning issue #18089: under manual optimisation ``clip_gradients`` ran on scaled gradients, so
    a clip to ``c`` left ``c / scale`` after unscaling. The gradient the optimiser sees must have norm
    ``max_grad_norm`` (the clip is active: the raw norm is far larger)."""
    max_norm = 1e-4
    m = ppo(tiny_model_dir, rm_dir, kl_coef=0.0, optim=OptimSpec(learning_rate=1e-3, max_grad_norm=max_norm))
    norms = GradNorms()
    # Lightning turns precision="16-mixed" on CPU into bf16-mixed; its plugin with a CPU GradScaler
    # is the CUDA code path (fp16 autocast, scaled loss, unscale in optimizer_step) on the CPU.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(None, callbacks=[norms], plugins=[plugin])
    t.fit(m, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    assert t.precision_plugin.scaler is not None
    finite = [n for n in norms.norms if n == n and n != float("inf")]
    assert finite, norms.norms
    assert norms.scales[0] > 1  # the gradients really were scaled
    for n in finite:
        assert n == pytest.approx(max_norm, rel=1e-3)
