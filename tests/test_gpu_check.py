"""scripts/gpu_check.sh's CPU dry run: every check it would run on a GPU runs here too (tiny steps)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CPU_CHECKS = ["sft", "sft-lora", "sft-qlora", "reward", "dpo-lora", "ppo-lora+eval", "grpo-lora", "ppo-bf16-true", "pipeline-eval"]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(repo_root, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--steps", "1", "--only", ",".join(CPU_CHECKS),
         "--work_dir", str(tmp_path)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = proc.stdout.split("# summary\n")[-1].splitlines()
    status = {line.split()[1]: line.split()[0] for line in summary if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert status == {c: "SKIP" if c == "sft-qlora" else "PASS" for c in CPU_CHECKS}, proc.stdout[-3000:]


def test_gpu_check_without_cuda_fails_in_one_line(repo_root):
    if __import__("torch").cuda.is_available():
        pytest.skip(reason="CUDA is available here: the script would run the checks")
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stdout.strip() == "FAIL cuda: torch.cuda.is_available() is False"
