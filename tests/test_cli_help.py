"""Help in a fresh process: ``fit --help`` names the stages and how to see their options; a plain help
request is answered from a cache keyed on everything that determines it (no Lightning import then);
``pipeline --help`` imports neither torch nor Lightning. Times: scripts/bench_cli_help.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlhf.cli import help_key, help_request

REPO = Path(__file__).resolve().parents[1]
STAGES = ("SFTModule", "RewardModule", "DPOModule", "PPOModule", "GRPOModule")


def run_cli(*args: str, cache: Path, importtime: bool = False, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "lightning_rlhf.cli", *args]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "100", "OMP_NUM_THREADS": "1", **env}
    env.pop("LIGHTNING_RLHF_HELP_CACHE", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` output."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.slow
def test_fit_help_in_a_fresh_process_lists_the_stages_then_comes_from_the_cache(tmp_path):
    first = run_cli("fit", "--help", cache=tmp_path)
    assert first.returncode == 0, first.stderr
    for name in STAGES:
        assert f"lightning_rlhf.stages.{name}" in first.stdout  # the model's known subclasses
    assert "lightning-rlhf fit --model.help SFTModule" in first.stdout.replace("\n", " ")
    assert "--data.train_files" in first.stdout and "--trainer.max_steps" in first.stdout
    assert len(list((tmp_path / "lightning-rlhf" / "help").glob("*.txt"))) == 1

    second = run_cli("fit", "--help", cache=tmp_path, importtime=True)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "lightning" not in imported(second.stderr) and "torch" not in imported(second.stderr)

    # Another terminal width is another key: a new text, wrapped to it, not the cached one.
    narrow = run_cli("fit", "--help", cache=tmp_path, COLUMNS="60")
    assert narrow.returncode == 0 and narrow.stdout != first.stdout
    assert len(narrow.stdout.splitlines()) > len(first.stdout.splitlines())  # wrapped narrower
    assert len(list((tmp_path / "lightning-rlhf" / "help").glob("*.txt"))) == 2


@pytest.mark.slow
def test_model_help_shows_a_stage_options_and_a_bad_class_is_not_cached(tmp_path):
    out = run_cli("fit", "--model.help", "SFTModule", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--model.policy POLICY" in out.stdout and "--model.optim" in out.stdout
    bad = run_cli("fit", "--model.help", "NoSuchModule", cache=tmp_path)
    assert bad.returncode != 0
    assert len(list((tmp_path / "lightning-rlhf" / "help").glob("*.txt"))) == 1


def test_pipeline_help_imports_neither_torch_nor_lightning(tmp_path):
    out = run_cli("pipeline", "--help", cache=tmp_path, importtime=True)
    assert out.returncode == 0 and "--config CONFIG" in out.stdout and "--output_dir" in out.stdout
    assert not {"torch", "lightning"} & imported(out.stderr)


def test_only_plain_help_requests_are_cached(tmp_path):
    assert help_request(["fit", "--help"]) and help_request(["validate", "-h"])
    assert help_request(["fit", "--model.help", "SFTModule"])
    assert not help_request(["fit", "--config", "configs/demo/sft.yaml", "--help"])  # depends on the file
    (tmp_path / "cfg.yaml").write_text("{}")
    assert not help_request(["fit", "--trainer.callbacks.help", str(tmp_path / "cfg.yaml")])
    assert not help_request(["fit", "--trainer.max_steps", "3"])
    # a user's class: its source is not in the key, so its help is never cached
    assert help_request(["fit", "--model.help", "lightning_rlhf.stages.SFTModule"])
    assert not help_request(["fit", "--model.help", "my_project.stages.MyStage"])


def test_help_key_changes_with_what_determines_the_text(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "stage.py").write_text("class A: pass\n")
    base = help_key(["fit", "--help"], [str(pkg)])
    assert help_key(["fit", "--help"], [str(pkg)]) == base
    assert help_key(["validate", "--help"], [str(pkg)]) != base
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
    assert help_key(["fit", "--help"], [str(pkg)]) != base
    monkeypatch.delenv("JSONARGPARSE_DEFAULT_ENV")
    assert help_key(["fit", "--help"], [str(pkg)]) == base
    (pkg / "stage.py").write_text("class A:\n    x: int = 1\n")  # a source edit
    assert help_key(["fit", "--help"], [str(pkg)]) != base
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "somelib-1.0.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    edited = help_key(["fit", "--help"], [str(pkg)])
    (tmp_path / "site" / "somelib-1.0.dist-info").rename(tmp_path / "site" / "somelib-1.1.dist-info")  # an upgrade
    assert help_key(["fit", "--help"], [str(pkg)]) != edited


def test_the_cache_keeps_only_the_newest_texts(tmp_path):
    from lightning_rlhf.cli import _prune

    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(str(i))
        os.utime(tmp_path / f"{i}.txt", ns=(i * 10**9, i * 10**9))
    _prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.txt", "4.txt"]
