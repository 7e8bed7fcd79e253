"""The online stages' side effects as callbacks: ``PeriodicExport`` and ``SampleTable`` come from the
module's options (old YAML keeps working) or from ``trainer.callbacks``; they count rollout steps.
``CompileLayers``: the offline stages' decoder layers compiled in place, the same training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_rlhf.callbacks import CompileLayers, PeriodicExport, SampleTable
from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.stages import DPOModule, GRPOModule


def alternate(prompts, completions, **_):
    """0, 1, 0, 1...: every group of two has signal, so every rollout step moves the policy."""
    return [float(i % 2) for i in range(len(completions))]


def grpo(policy, **kw) -> GRPOModule:
    kw.setdefault("log_samples_every_n_steps", 0)
    return GRPOModule(policy=str(policy), reward_functions=[f"{__name__}.alternate"], num_generations=2, beta=0.0,
                      generation={"max_new_tokens": 3}, optim={"learning_rate": 1e-2, "scheduler": "constant"},
                      **kw)  # fmt: skip


def fit(module, tmp_path, steps: int, callbacks=()) -> L.Trainer:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "review number {i}"}}\n' for i in range(2 * steps)))
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, max_epochs=1, limit_train_batches=steps, callbacks=list(callbacks))  # fmt: skip
    t.fit(module, RLHFDataModule(str(prompts), batch_size=2, shuffle=False))
    return t


def test_options_give_the_callbacks_and_nothing_when_off(tiny_model_dir, tmp_path):
    m = grpo(tiny_model_dir, log_samples_every_n_steps=5, save_every_n_steps=2, output_dir=str(tmp_path))
    kinds = {type(c): c for c in m.configure_callbacks()}
    assert set(kinds) == {SampleTable, PeriodicExport}
    assert kinds[SampleTable].every_n_steps == 5 and kinds[PeriodicExport].every_n_steps == 2
    assert grpo(tiny_model_dir, save_every_n_steps=2).configure_callbacks() == []  # no output_dir: no export


def test_export_every_n_rollout_steps_from_the_option(tiny_model_dir, tmp_path):
    m = grpo(tiny_model_dir, save_every_n_steps=2, output_dir=str(tmp_path / "out"))
    t = fit(m, tmp_path, steps=3)
    assert t.global_step == 3  # one optimiser step per rollout step here
    # rollout steps 2 only (not 1 and 3); then the final export
    assert sorted(p.name for p in (tmp_path / "out").glob("step-*")) == ["step-2"]
    assert (tmp_path / "out" / "config.json").exists()
    mid = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "step-2")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    moved = any(not torch.equal(a, b) for a, b in zip(mid.parameters(), final.parameters(), strict=True))
    assert moved  # step-2 is the policy after 2 rollout steps, not the final one


def test_export_callback_given_to_the_trainer(tiny_model_dir, tmp_path):
    m = grpo(tiny_model_dir)  # no save_every_n_steps, no output_dir
    fit(m, tmp_path, steps=2, callbacks=[PeriodicExport(1, output_dir=str(tmp_path / "exports"))])
    assert sorted(p.name for p in (tmp_path / "exports").glob("step-*")) == ["step-1", "step-2"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exports" / "step-2")
    for a, b in zip(exported.parameters(), m.policy.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_under_the_fabric_runner_the_module_runs_its_callbacks(tiny_model_dir, tmp_path):
    """Fabric runs no Trainer callbacks: the module's on_train_batch_end runs those of its options."""
    from lightning_rlhf.fabric import FabricRunner, build_fabric

    L.seed_everything(0)
    m = grpo(tiny_model_dir, save_every_n_steps=1, output_dir=str(tmp_path / "out"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "review number {i}"}}\n' for i in range(4)))
    fabric = build_fabric(accelerator="cpu", devices=1, precision="32-true")
    FabricRunner(fabric, max_steps=2).fit(m, RLHFDataModule(str(prompts), batch_size=2, shuffle=False))
    assert sorted(p.name for p in (tmp_path / "out").glob("step-*")) == ["step-1", "step-2"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "step-2")
    for a, b in zip(exported.parameters(), m.policy.parameters(), strict=True):
        assert torch.equal(a, b.detach())


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def dpo_fit(model_dir, tmp_path, callbacks=()) -> tuple[DPOModule, list[float]]:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "review item {i} .", "chosen": "it is great {"and good " * (i % 3)}.", '
                             f'"rejected": "it is bad ."}}\n' for i in range(6)))  # fmt: skip
    module = DPOModule(str(model_dir), reference=str(model_dir), optim={"learning_rate": 1e-2, "scheduler": "constant"})
    losses = Losses()
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, max_steps=3, callbacks=[losses, *callbacks])  # fmt: skip
    t.fit(module, RLHFDataModule(str(pairs), batch_size=2, shuffle=False))
    return module, losses.losses


@pytest.mark.slow
def test_compile_layers_compiles_the_trained_and_the_frozen_layers_and_trains_the_same(tiny_model_dir, tmp_path):
    eager, eager_losses = dpo_fit(tiny_model_dir, tmp_path)
    compiled, compiled_losses = dpo_fit(tiny_model_dir, tmp_path, callbacks=[CompileLayers()])
    layers = [m for model in compiled.held_models() for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(layers) == 4 and all(m._compiled_call_impl is not None for m in layers)  # policy's 2 + reference's 2
    assert not any(m._compiled_call_impl is not None for model in eager.held_models() for m in model.modules())
    assert len(compiled_losses) == 3 and compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager_losses[-1] < eager_losses[0]  # the steps trained
    a, b = eager.exported_model().state_dict(), compiled.exported_model().state_dict()
    assert a.keys() == b.keys()  # compiled in place: the same parameter names (checkpoints, export)
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = torch.cat([(a[k] - init[k]).flatten() for k in a]).norm()
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    assert apart < 1e-3 * moved  # (here ~3e-5: inductor's kernels round differently from eager's)


def test_compile_layers_refuses_an_online_stage(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="CompileLayers compiles the offline stages' models .* not GRPOModule's"):
        fit(grpo(tiny_model_dir), tmp_path, steps=1, callbacks=[CompileLayers()])
