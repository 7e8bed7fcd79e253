"""The embedded demo: gold reward by hand, exact match, deterministic data, shipped tokenizer/assets."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

from lightning_rlhf.demo import data as demo_data
from lightning_rlhf.demo import reverse, reviews, rewards
from lightning_rlhf.demo.assets import build_assets, build_tokenizer

P = "review the phone ."

# (response, gold) for the prompt P, each checked by hand: sum of per-sentence scores / 3, clipped.
GOLD_CASES = [
    # three different positive sentences about the phone: (1 + 1 + 1) / 3
    ("the phone is great . i love this phone . it works well .", 1.0),
    ("the phone is very good .", 1 / 3),
    ("it arrived today .", 0.0),  # neutral phrase
    ("the phone is awful .", -1 / 3),  # negative
    ("i hate this phone . it broke fast .", -2 / 3),
    ("the laptop is great .", -0.5 / 3),  # praises another product
    ("i love this laptop . the phone is great .", (-0.5 + 1) / 3),
    ("the phone is great . the phone is great .", (1 - 1) / 3),  # repeated
    ("the phone is great . it works well . the phone is great .", (1 + 1 - 1) / 3),
    ("phone the great .", -1 / 3),  # malformed word order
    ("the phone is so great .", -1 / 3),  # 5-word form needs "very"
    ("the phone is great", -1 / 3),  # no full stop
    ("the phone is great . it works", (1 - 1) / 3),  # trailing fragment is malformed
    ("the phone is great . i love this phone . it works well . it feels solid .", (3 - 1) / 3),  # too long
    ("", -1.0),
    ("   ", -1.0),
    # (-1 -1 -1 -1 -1) / 3 = -5/3, clipped to -1
    ("the phone is awful . i hate this phone . it broke fast . it was a waste . the phone is bad .", -1.0),
]


@pytest.mark.parametrize(("response", "expected"), GOLD_CASES)
def test_gold_reward_hand_checked(response, expected):
    assert reviews.gold_reward(P, response) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_reasons_and_bounds():
    reasons = [
        s.reason
        for s in reviews.score_sentences(
            P, "the phone is great . the laptop is bad . x . the phone is great . it works well ."
        )
    ]
    assert reasons == ["positive", "off-topic", "malformed", "too long", "too long"]
    # The prompt's product decides what is on topic, whatever the template.
    for t in range(len(reviews.PROMPT_TEMPLATES)):
        assert reviews.gold_reward(
            reviews.prompt_text("laptop", t), "the laptop is great ."
        ) == pytest.approx(1 / 3)
        assert reviews.gold_reward(reviews.prompt_text("laptop", t), "the phone is great .") == pytest.approx(
            -0.5 / 3
        )


def test_reward_functions_take_trl_signature_and_chat_prompts():
    prompts = [P, [{"role": "system", "content": "be nice"}, {"role": "user", "content": P}]]
    completions = ["the phone is great . i love this phone . it works well .", "the phone is awful ."]
    assert rewards.gold_reward(prompts, completions, answer=[None, None]) == pytest.approx([1.0, -1 / 3])
    rp = "reverse : red cat sun ="
    assert rewards.reverse_exact_match(
        [rp, [{"role": "user", "content": rp}]], [" sun cat red", "red cat sun"]
    ) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("sun cat red", 1.0),
        (" sun cat red", 1.0),  # TRL's leading space
        ("  sun   cat red \n", 1.0),  # whitespace-insensitive
        ("red cat sun", 0.0),  # copied, not reversed
        ("sun red cat", 0.0),  # two words swapped
        ("sun cat", 0.0),  # missing a word
        ("sun cat red red", 0.0),
        ("sun cat red .", 0.0),
        ("", 0.0),
    ],
)
def test_exact_match(completion, expected):
    assert reverse.exact_match("reverse : red cat sun =", completion) == expected


# ---------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def fresh_data(tmp_path_factory) -> Path:
    return demo_data.write_demo_data(tmp_path_factory.mktemp("demo-data"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl"))


def test_generator_is_deterministic_and_seeded():
    a, b = demo_data.review_records(0), demo_data.review_records(0)
    assert a == b
    assert demo_data.reverse_records(0) == demo_data.reverse_records(0)
    assert demo_data.review_records(1)["sft_train"] != a["sft_train"]


def test_committed_demo_data_equals_a_fresh_build(fresh_data, repo_root):
    committed = repo_root / "data" / "demo"
    assert _files(committed) == _files(fresh_data)
    assert len(_files(committed)) == 14
    for rel in _files(fresh_data):
        assert filecmp.cmp(committed / rel, fresh_data / rel, shallow=False), (
            f"data/demo/{rel} drifted: rerun python -m lightning_rlhf.demo.data"
        )


def test_split_sizes(fresh_data):
    for split, n in demo_data.SIZES.items():
        assert len(_read(fresh_data / "reviews" / f"{split}.jsonl")) == n
    for split, n in demo_data.REVERSE_SIZES.items():
        assert len(_read(fresh_data / "reverse" / f"{split}.jsonl")) == n
    for split, n in demo_data.SENTIMENT_SIZES.items():
        assert len(_read(fresh_data / "sentiment" / f"{split}.jsonl")) == n


def test_sentiment_exact_match_by_hand():
    from lightning_rlhf.demo import sentiment

    assert sentiment.exact_match("review : the lamp is very lovely =", " good") == 1.0
    assert sentiment.exact_match("review : the lamp is awful =", "bad") == 1.0
    assert sentiment.exact_match("review : the lamp is black =", "okay") == 1.0
    assert sentiment.exact_match("review : the lamp is black =", "good") == 0.0
    assert sentiment.exact_match("review : the lamp is awful =", "bad bad") == 0.0
    assert sentiment.answer_of("review : the lamp is purple =") is None


def test_sentiment_data_is_noisy_at_the_documented_rate(fresh_data):
    from lightning_rlhf.demo import sentiment

    recs = _read(fresh_data / "sentiment" / "sft_train.jsonl")
    right = sum(sentiment.exact_match(r["prompt"], r["completion"]) for r in recs) / len(recs)
    # Binomial std for n=3000 is ~0.008: the rate is the documented one, not 0 and not all.
    assert abs((1 - right) - sentiment.NOISE) < 0.03
    for r in _read(fresh_data / "sentiment" / "prompts_eval.jsonl"):
        assert sentiment.answer_of(r["prompt"]) == r["answer"]


def test_chosen_beats_rejected_on_every_pair(fresh_data):
    for split in ("pref_train", "pref_val"):
        for i, r in enumerate(_read(fresh_data / "reviews" / f"{split}.jsonl")):
            prompt = r["prompt"][0]["content"]
            gc = reviews.gold_reward(prompt, r["chosen"][0]["content"])
            gr = reviews.gold_reward(prompt, r["rejected"][0]["content"])
            assert gc > gr, (split, i)


def test_sft_gold_covers_the_range(fresh_data):
    """SFT responses span bad to perfect, so later stages have room to improve (mean near the middle)."""
    golds = [
        reviews.gold_reward(r["messages"][0]["content"], r["messages"][1]["content"])
        for r in _read(fresh_data / "reviews" / "sft_train.jsonl")
    ]
    assert min(golds) == -1.0 and max(golds) == 1.0
    assert -0.3 < sum(golds) / len(golds) < 0.3


def test_reverse_eval_prompts_are_held_out(fresh_data):
    seen = set()
    for split in ("sft_train", "sft_val", "prompts_train"):
        seen |= {r["prompt"] for r in _read(fresh_data / "reverse" / f"{split}.jsonl")}
    evals = _read(fresh_data / "reverse" / "prompts_eval.jsonl")
    assert not seen & {r["prompt"] for r in evals}
    # and the answer column is the right answer
    for r in evals:
        assert reverse.exact_match(r["prompt"], r["answer"]) == 1.0


def test_reverse_sft_data_is_noisy_but_mostly_right(fresh_data):
    recs = _read(fresh_data / "reverse" / "sft_train.jsonl")
    right = sum(reverse.exact_match(r["prompt"], r["completion"]) for r in recs) / len(recs)
    # P(right) = 1 - noise (a copy of a list of >= 3 distinct words is never its reverse)
    assert abs(right - (1 - demo_data.REVERSE_NOISE)) < 0.05


# ------------------------------------------------------------------------------ tokenizer/assets


def _demo_texts(root: Path) -> list[str]:
    texts = []
    for rel in _files(root):
        for r in _read(root / rel):
            for v in r.values():
                if isinstance(v, str):
                    texts.append(v)
                else:  # a message list
                    texts.extend(m["content"] for m in v)
    return texts


def test_tokenizer_round_trips_every_demo_text(repo_root, demo_tokenizer):
    texts = sorted(set(_demo_texts(repo_root / "data" / "demo")))
    assert len(texts) > 1000
    unk = demo_tokenizer.unk_token_id
    for text in texts:
        ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, text
        # reverse completions start with TRL's separating space, which a word-level tokenizer drops
        assert demo_tokenizer.decode(ids) == text.lstrip(" "), text


def test_tokenizer_has_every_task_word(demo_tokenizer):
    vocab = demo_tokenizer.get_vocab()
    assert set(reviews.WORDS) | set(reverse.VOCAB) <= set(vocab)
    assert demo_tokenizer.pad_token == "<pad>" and demo_tokenizer.eos_token == "</s>"
    assert demo_tokenizer.padding_side == "right"
    assert demo_tokenizer.pad_token_id != demo_tokenizer.eos_token_id


def test_shipped_assets_equal_a_fresh_build(tmp_path, demo_dir):
    out = build_assets(tmp_path / "tiny-llama")
    shipped = sorted(p.name for p in demo_dir.iterdir())
    assert shipped == sorted(p.name for p in out.iterdir())
    for name in shipped:
        assert filecmp.cmp(demo_dir / name, out / name, shallow=False), (
            f"{name} drifted: rerun python -m lightning_rlhf.demo.assets"
        )
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["vocab_size"] == len(build_tokenizer())


@pytest.mark.parametrize(
    "conversation",
    [
        [{"role": "user", "content": P}, {"role": "assistant", "content": "the phone is great ."}],
        [
            {"role": "system", "content": "i love this lamp ."},
            {"role": "user", "content": "reverse : red cat sun ="},
            {"role": "assistant", "content": "sun cat red"},
        ],
        [
            {"role": "user", "content": P},
            {"role": "assistant", "content": "the phone is bad ."},
            {"role": "user", "content": "review the bag ."},
            {"role": "assistant", "content": "it came in a box ."},
        ],
    ],
)
def test_chat_template_prompt_is_a_token_prefix(demo_tokenizer, conversation):
    def ids(text):
        return demo_tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = demo_tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = demo_tokenizer.apply_chat_template(conversation, tokenize=False)
    p, f = ids(prompt), ids(full)
    assert f[: len(p)] == p
    assert demo_tokenizer.unk_token_id not in f
    # the completion tokens are the answer followed by EOS
    answer = ids(conversation[-1]["content"])
    assert f[len(p) :] == answer + [demo_tokenizer.eos_token_id]
