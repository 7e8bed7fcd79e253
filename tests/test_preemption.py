"""Pre-emption and crashes, on real `lightning-rlhf fit` child processes: SIGTERM saves a checkpoint and
exits 143; after SIGKILL the run resumes from its last checkpoint and ends at the expected step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 400  # far more than the kill leaves time for


def fit_cmd(tmp: Path, ckpt_dir: Path, max_steps: int, *extra: str) -> list[str]:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_last": True,
                                "save_top_k": 0}}]
    return [sys.executable, "-m", "lightning_rlhf", "fit", "--config", str(REPO / "configs/demo/sft.yaml"),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "true",
            "--trainer.callbacks", yaml.safe_dump(callbacks, default_flow_style=True).strip(),
            "--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "100", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp),
            "--model.init_args.output_dir", str(tmp / "out"), "--data.val_files", "null", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def wait_for_step(ckpt: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"] >= step:
                    return
            except Exception:  # being renamed into place
                pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} after {timeout} s")


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen(fit_cmd(tmp_path, ckpt_dir, STEPS), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(ckpt_dir / "last.ckpt", 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    saved = ckpt_dir / "sigterm.ckpt"
    step = torch.load(saved, weights_only=False, map_location="cpu")["global_step"]
    assert 2 <= step < STEPS
    assert f"stopped by SIGTERM after step {step}; checkpoint saved to {saved}" in err
    assert "Traceback" not in err


def test_after_sigkill_the_run_resumes_from_the_last_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    last = ckpt_dir / "last.ckpt"
    proc = subprocess.Popen(fit_cmd(tmp_path, ckpt_dir, 12), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(last, 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    killed_at = torch.load(last, weights_only=False, map_location="cpu")["global_step"]
    assert 3 <= killed_at < 12 and not (tmp_path / "out" / "config.json").exists()
    out = subprocess.run(fit_cmd(tmp_path, ckpt_dir, 12, "--ckpt_path", str(last)), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in out.stdout + out.stderr
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 12
    assert (tmp_path / "out" / "config.json").exists()  # the finished run exported its model
