"""README's Python snippets run as printed (from the repository root, on the demo model and data), so
the documentation cannot drift from the API; only their output folders are redirected to a temporary one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    code = BLOCKS[index].replace('"outputs/', f'"{tmp_path}/outputs/')
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    # every snippet ends with a trained model saved where it says
    saved = list((tmp_path / "outputs").glob("*/config.json"))
    assert saved, "the snippet saved no model"


def test_readme_says_how_to_see_a_stage_options_and_set_threads():
    """Two things issue 13 asked README to say: how to list a stage's options, and the thread setting for small
    models on a CPU."""
    text = (REPO / "README.md").read_text()
    assert "lightning-rlhf fit --model.help SFTModule" in text
    assert "OMP_NUM_THREADS=1 lightning-rlhf fit" in text
