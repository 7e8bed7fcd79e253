"""The embedded default model: a tiny Llama config and a word-level tokenizer, shipped in the package.

``assets/tiny-llama/`` holds ``config.json`` and the tokenizer files (no weights): the model loader
builds a folder without weights from its config with a fixed seed, which is the untrained "base"
model of the demo. :func:`build_assets` writes the folder deterministically from the task
vocabularies in a second; ``python -m lightning_rlhf.demo.assets`` rebuilds it, and a test checks
that the shipped files equal a fresh build.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import reverse, reviews

ASSETS = Path(__file__).parent / "assets"

SPECIAL_TOKENS = ["<pad>", "<unk>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Chat template: one turn per line-free segment. Rendering a conversation without its last assistant
# turn plus the generation prompt is a token prefix of rendering it in full (needed for masks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

MODEL_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def base_model_dir() -> Path:
    """Folder of the untrained demo model (config + tokenizer, no weights)."""
    return ASSETS / "tiny-llama"


def tokenizer_dir() -> Path:
    return base_model_dir()


def vocabulary() -> list[str]:
    words = sorted(set(reviews.WORDS) | set(reverse.VOCAB))
    return SPECIAL_TOKENS + words


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        padding_side="right",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_assets(out: Path | None = None) -> Path:
    out = Path(out or base_model_dir())
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save_pretrained(out)
    vocab_size = len(tok)
    config = dict(
        MODEL_CONFIG,
        vocab_size=vocab_size,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    print(build_assets())
