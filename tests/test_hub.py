"""Hub ids for models and data, resolved offline from a Hugging Face cache the test fills by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_rlhf.data import load_records
from lightning_rlhf.data.records import DataFormatError
from lightning_rlhf.hub import HubNameError, is_hub_name
from lightning_rlhf.models import load_causal_lm

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAIRS = [{"prompt": f"review the {x} .", "chosen": " it is great .", "rejected": " it is bad ."} for x in ("phone", "lamp")]


def cache_repo(hub: Path, repo_type: str, repo_id: str, files: dict[str, Path | str]) -> Path:
    """Write a repository snapshot in huggingface_hub's cache layout: ``<type>s--org--name/refs/main``
    holds the commit, ``snapshots/<commit>/`` the files (as a download would leave them)."""
    root = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy(src, snap / rel)
        else:
            (snap / rel).write_text(src)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hf_home(tmp_path, tiny_model_dir):
    home = tmp_path / "hf"
    cache_repo(home / "hub", "model", "tiny-org/tiny-llama", {p.name: p for p in tiny_model_dir.iterdir()})
    jsonl = lambda recs: "".join(json.dumps(r) + "\n" for r in recs)  # noqa: E731
    cache_repo(home / "hub", "dataset", "tiny-org/prefs", {
        "data/train.jsonl": jsonl(PAIRS), "data/test.jsonl": jsonl(PAIRS[:1]),
    })  # fmt: skip
    return home


@pytest.mark.slow
def test_model_and_data_hub_ids_resolve_offline_from_the_cache(hf_home, tiny_model_dir, tmp_path, repo_root):
    script = textwrap.dedent(f"""
        import lightning as L, torch
        from lightning_rlhf.data import RLHFDataModule, load_records
        from lightning_rlhf.models import load_causal_lm
        from lightning_rlhf.stages import DPOModule
        hub = load_causal_lm("tiny-org/tiny-llama", trainable=False)
        local = load_causal_lm({str(tiny_model_dir)!r}, trainable=False)
        assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), local.state_dict().values()))
        assert load_records("tiny-org/prefs:test") == {PAIRS[:1]!r}
        m = DPOModule("tiny-org/tiny-llama")  # the policy, its tokenizer and its reference by Hub id
        dm = RLHFDataModule("tiny-org/prefs", batch_size=2, max_length=32, max_prompt_length=16)
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(m, datamodule=dm)
        assert len(dm.train_examples) == 2
        from pathlib import Path
        from lightning_rlhf.pipeline import _model_path
        assert (_model_path("tiny-org/tiny-llama", Path("outputs")) / "config.json").exists()  # pipeline evaluation
        print("OK")
    """)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_an_unknown_name_gives_one_clear_message():
    with pytest.raises(HubNameError) as e:
        load_causal_lm("nobody-here/no-such-model")
    msg = str(e.value)
    assert "'nobody-here/no-such-model'" in msg and "not a local folder" in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(DataFormatError, match=r"dataset 'nobody-here/no-such-data': not a local folder"):
        load_records("nobody-here/no-such-data:train")


def test_local_paths_are_never_taken_for_hub_names(tmp_path):
    assert is_hub_name("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_name("gpt2")
    assert not is_hub_name(str(tmp_path))  # exists
    assert not is_hub_name("outputs/demo/sft")  # a folder path, not org/name
    assert not is_hub_name("./sft") and not is_hub_name("../x/y")
    with pytest.raises(DataFormatError, match="data/train.jsonl: no such file or folder"):
        load_records("data/train.jsonl")  # a missing local file keeps its own message
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_causal_lm("outputs/demo/no-such-stage")
