"""Shared fixtures: offline environment, the demo tokenizer, tiny Llama folders, JSONL writers.

Everything here is built locally in seconds; nothing is downloaded. The tiny models use the
shipped demo tokenizer (``lightning_rlhf/demo/assets/tiny-llama``), so any demo text can be fed to
them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports wandb / huggingface_hub: no network, no prompts, no console noise.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_CONSOLE"] = "off"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test models are tiny, and on a shared, busy CPU OpenMP's thread team
# turns a 10 ms step into seconds. Override with OMP_NUM_THREADS=N.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny Llama: fast on two CPU cores, still a real decoder (GQA, RoPE, RMSNorm, SwiGLU).
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (configs/, data/demo/ live there)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The shipped demo model folder (config + tokenizer, no weights)."""
    from lightning_rlhf.demo.assets import base_model_dir

    return base_model_dir()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    """The shipped word-level demo tokenizer, loaded as stages load it (right padding, pad set).

    Session-scoped: do not mutate it in a test (copy it or load your own).
    """
    from lightning_rlhf.models import load_tokenizer

    return load_tokenizer(demo_dir)


def tiny_llama_config(tokenizer, **overrides):
    """A ``LlamaConfig`` of the tiny test size whose vocabulary is the tokenizer's."""
    from transformers import LlamaConfig

    kw = dict(
        TINY_LLAMA,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tiny_config(demo_tokenizer):
    """The ``LlamaConfig`` of the tiny test model (vocabulary = the demo tokenizer's); shared: deepcopy it to change it."""
    return tiny_llama_config(demo_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A Hugging Face folder with a tiny random Llama (seed 0, weights saved) and the demo tokenizer.

    Load it with ``lightning_rlhf.models.load_causal_lm(str(tiny_model_dir))`` or
    ``AutoModelForCausalLM.from_pretrained``. Read-only: write trained models elsewhere.
    """
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(demo_tokenizer))
    model.save_pretrained(out)
    demo_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory, demo_tokenizer):
    """Like ``tiny_model_dir`` but with ``config.json`` and no weights (built from config by the loader)."""
    out = tmp_path_factory.mktemp("tiny-llama-config")
    tiny_llama_config(demo_tokenizer).save_pretrained(out)
    demo_tokenizer.save_pretrained(out)
    return out


def _write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, records) -> path``: one JSON object per line."""
    return _write_jsonl


# Eight short review records the tiny model memorises in a few dozen steps (prompt/completion,
# conversational, so the chat template and completion-only loss are exercised).
MEMO_PAIRS = [
    ("review the phone .", "the phone is great . it works well ."),
    ("review the laptop .", "i hate this laptop . it broke fast ."),
    ("review the camera .", "the camera is very good ."),
    ("review the watch .", "i love this watch . it feels solid ."),
    ("review the lamp .", "the lamp is awful ."),
    ("review the chair .", "it came in a box . i own this chair ."),
    ("review the bag .", "the bag is lovely . it was worth it ."),
    ("review the kettle .", "i returned this kettle ."),
]


@pytest.fixture(scope="session")
def memo_records() -> list[dict]:
    """Conversational prompt/completion SFT records (8), small enough to memorise."""
    return [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
        for p, c in MEMO_PAIRS
    ]


@pytest.fixture(scope="session")
def memo_sft_file(tmp_path_factory, memo_records) -> Path:
    """``memo_records`` written as JSONL (train and val are the same file in tests that memorise)."""
    return _write_jsonl(tmp_path_factory.mktemp("memo") / "sft.jsonl", memo_records)


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    """Four review prompts (conversational prompt-only records) for generation and evaluation."""
    recs = [{"prompt": [{"role": "user", "content": p}]} for p, _ in MEMO_PAIRS[:4]]
    return _write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", recs)
