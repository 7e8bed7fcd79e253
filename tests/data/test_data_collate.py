"""Collators, packing (every token once, no cross-example attention in a real Llama) and model_inputs."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.data import PreferenceCollator, PromptCollator, SFTCollator, model_inputs, pack


def _examples(lengths, seed=0):
    g = random.Random(seed)
    out = []
    for n in lengths:
        ids = [g.randrange(3, 60) for _ in range(n)]
        out.append({"input_ids": ids, "loss_mask": [0] + [g.randrange(2) for _ in range(n - 1)]})
    return out


@pytest.mark.parametrize("strategy", ["ffd", "greedy"])
def test_pack_puts_every_example_once_within_max_length(strategy):
    lengths = [random.Random(i).randrange(1, 40) for i in range(200)]
    rows = pack(lengths, 64, strategy)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    if strategy == "ffd":
        assert len(rows) <= len(pack(lengths, 64, "greedy"))


def _first_fit_decreasing(lengths, max_length):
    """The textbook first-fit decreasing: scan the rows in order for the first with room (O(N * rows))."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_ffd_pack_equals_the_textbook_first_fit_decreasing(seed):
    rng = random.Random(seed)
    n, max_length = rng.choice([1, 2, 7, 300]), rng.choice([8, 64, 512])
    lengths = [rng.randint(1, max_length) for _ in range(n)]
    assert pack(lengths, max_length, "ffd") == _first_fit_decreasing(lengths, max_length)


def test_packed_batch_holds_every_token_once_with_restarting_positions():
    exs = _examples([5, 3, 7, 2, 6])
    rows = [[exs[i] for i in row] for row in pack([len(e["input_ids"]) for e in exs], 12)]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["packed"]
    got = []
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex["input_ids"])
            assert batch["input_ids"][r, start : start + n].tolist() == ex["input_ids"]
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["loss_mask"][r, start].item() == 0  # first token of an example is never a target
            assert batch["loss_mask"][r, start + 1 : start + n].tolist() == ex["loss_mask"][1:]
            got.append(tuple(ex["input_ids"]))
            start += n
        assert batch["attention_mask"][r].sum().item() == start
    assert sorted(got) == sorted(tuple(e["input_ids"]) for e in exs)
    assert model_inputs(batch)["attention_mask"] is None


def _tiny_llama(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(attn):
    model = _tiny_llama(attn)
    exs = _examples([6, 9, 4, 11, 3, 7, 5])
    rows = [[exs[i] for i in row] for row in pack([len(e["input_ids"]) for e in exs], 20)]
    assert max(len(r) for r in rows) > 1 and any(sum(len(e["input_ids"]) for e in r) < 20 for r in rows)
    batch = SFTCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for r, row in enumerate(rows):
            start = 0
            for ex in row:
                n = len(ex["input_ids"])
                alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[r, start : start + n], alone, atol=1e-5, rtol=0)
                start += n


def test_packed_rows_leak_when_the_model_keeps_a_cache():
    """Why model_inputs passes use_cache=False: with a cache, transformers skips packed-sequence detection."""
    model = _tiny_llama("sdpa")
    exs = _examples([6, 9])
    batch = SFTCollator(pad_token_id=0)([exs])
    with torch.no_grad():
        leaky = model(**{**model_inputs(batch), "use_cache": True}).logits[0, 6:15]
        alone = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_unpacked_sft_batch_matches_unpadded_run():
    model = _tiny_llama("sdpa")
    exs = _examples([4, 9])
    batch = SFTCollator(pad_token_id=0)(exs)
    assert not batch["packed"] and batch["attention_mask"].tolist()[0] == [1] * 4 + [0] * 5
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        alone = model(input_ids=torch.tensor([exs[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0, :4], alone, atol=1e-5, rtol=0)


def test_preference_batch_chosen_rows_then_rejected_rows():
    items = [{"prompt_ids": [1, 2], "chosen_ids": [3, 2], "rejected_ids": [4, 4, 2], "margin": 0.5, "index": 7},
             {"prompt_ids": [1], "chosen_ids": [5, 2], "rejected_ids": [6, 2], "margin": 0.0, "index": 3}]
    b = PreferenceCollator(pad_token_id=0)(items)
    assert b["input_ids"].tolist() == [[1, 2, 3, 2, 0], [1, 5, 2, 0, 0], [1, 2, 4, 4, 2], [1, 6, 2, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [4, 3, 5, 3]
    assert b["margin"].tolist() == [0.5, 0.0] and b["index"].tolist() == [7, 3]
    assert set(model_inputs(b)) == {"input_ids", "attention_mask", "position_ids", "use_cache"}


def test_prompt_batch_right_padded():
    items = [{"prompt_ids": [1, 2, 3], "prompt": "a", "prompt_text": "a", "extra": {"x": 1}, "index": 0},
             {"prompt_ids": [1], "prompt": "b", "prompt_text": "b", "extra": {}, "index": 1}]
    b = PromptCollator(pad_token_id=9)(items)
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 9, 9]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["extra"] == [{"x": 1}, {}] and b["index"].tolist() == [0, 1]
