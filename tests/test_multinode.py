"""Two "nodes" on one machine: two ``torchrun --nnodes 2 --node_rank 0/1`` launches of the CLI (gloo, CPU),
as the README's multi-node recipe runs them on two hosts (``trainer.num_nodes: 2``).

The two-node run must train exactly what one node with two processes trains (same seed, same global
batch, DDP averages the gradients over both nodes), so its export equals that run's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 400


def _fit_args(out: Path) -> list[str]:
    return [
        "-m", "lightning_rlhf", "fit", "--config", str(ROOT / "configs/demo/sft.yaml"),
        "--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.max_steps", "2",
        "--trainer.strategy", "ddp", "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--model.init_args.output_dir", str(out), "--data.batch_size", "8",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def test_two_nodes_by_torchrun_train_as_one_node_with_two_processes(tmp_path):
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                *torchrun,
                "--node_rank",
                str(rank),
                *_fit_args(tmp_path / "two_nodes"),
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
            ],  # fmt: skip
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = []
    try:
        for proc in nodes:
            _, err = proc.communicate(timeout=TIMEOUT)
            logs.append(err)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, err) in enumerate(zip(nodes, logs, strict=True)):
        assert proc.returncode == 0, f"node {rank}:\n{err[-4000:]}"
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in err  # one world of two, one rank per node

    one_node = tmp_path / "one_node"
    proc = subprocess.run(
        [sys.executable, *_fit_args(one_node), "--trainer.devices", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    two = load_file(tmp_path / "two_nodes" / "model.safetensors")
    one = load_file(one_node / "model.safetensors")
    from lightning_rlhf.demo.assets import base_model_dir
    from lightning_rlhf.models import load_causal_lm

    init = load_causal_lm(str(base_model_dir()), trainable=False).state_dict()
    assert two.keys() == one.keys()
    for name, w in two.items():
        torch.testing.assert_close(w, one[name], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(w, init[name]), f"{name} did not train"
