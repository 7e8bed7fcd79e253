"""Non-finite losses/gradients skip the step (counted) or stop the run; exports and checkpoints never hold
NaN weights; exports are written atomically. Real Trainer runs of the tiny Llama."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.errors import NonFiniteError
from lightning_rlhf.stages import SFTModule


class PoisonedSFT(SFTModule):
    """SFT whose loss is NaN on the chosen step (as a bad batch or an overflow would make it)."""

    poison_step = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == self.poison_step else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in self.policy.parameters()])


def fit(tiny_model_dir, memo_sft_file, tmp_path, nonfinite: str, steps: int = 3):
    module = PoisonedSFT(policy=str(tiny_model_dir), optim={"learning_rate": 1e-2, "nonfinite": nonfinite})
    module.snapshots = []
    dm = RLHFDataModule(str(memo_sft_file), kind="sft", batch_size=4, shuffle=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    return module, trainer


def test_a_nonfinite_step_is_skipped_and_counted(tiny_model_dir, memo_sft_file, tmp_path):
    module, trainer = fit(tiny_model_dir, memo_sft_file, tmp_path, "skip")
    s0, s1, s2 = module.snapshots
    assert all(torch.equal(a, b) for a, b in zip(s0, s1, strict=True))  # step 1 (NaN) changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(s1, s2, strict=True))  # step 2 trained again
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0


def test_a_nonfinite_step_stops_the_run_when_asked(tiny_model_dir, memo_sft_file, tmp_path):
    with pytest.raises(NonFiniteError, match=r"PoisonedSFT: non-finite loss at step 1 \(optim.nonfinite='stop'\)"):
        fit(tiny_model_dir, memo_sft_file, tmp_path, "stop")


def test_export_refuses_nan_weights_and_writes_atomically(tiny_model_dir, tmp_path):
    module = SFTModule(policy=str(tiny_model_dir))
    module.configure_model()
    out = tmp_path / "export"
    out.mkdir()
    (out / "fit_config.yaml").write_text("kept: true\n")
    module.save_pretrained(out)
    assert (out / "config.json").exists() and (out / "fit_config.yaml").read_text() == "kept: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(module.policy.parameters())[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="refusing to write an export to .* with non-finite weights: "):
        module.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == before  # the previous export is untouched
    with pytest.raises(NonFiniteError, match="a checkpoint with non-finite weights"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
