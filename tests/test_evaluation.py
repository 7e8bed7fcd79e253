"""evaluation: seeded sampling, KL to a reference, gold functions with gaps, completion loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.evaluation import SamplingSpec, completion_loss, evaluate_policy
from lightning_rlhf.models import load_causal_lm, load_sequence_classifier

GOLD = ["lightning_rlhf.demo.rewards.gold_reward"]
# 4 prompts in batches of 3 (uneven), 3 samples each, short responses
SAMPLING = SamplingSpec(max_new_tokens=6, num_samples=3, batch_size=3)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), trainable=False)


@pytest.fixture(scope="module")
def other(tiny_config):
    """A different tiny model with the same vocabulary; larger init, so its next-token
    distributions are far from the near-uniform ones of ``policy``."""
    import copy

    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny_config)
    config.initializer_range = 0.3
    torch.manual_seed(7)
    return LlamaForCausalLM(config).eval()


def evaluate(policy, tok, prompts, **kw):
    kw.setdefault("sampling", SAMPLING)
    return evaluate_policy(policy, tok, str(prompts), progress=False, **kw)


def test_same_seed_same_results_other_seed_other_samples(policy, demo_tokenizer, prompt_file):
    a = evaluate(policy, demo_tokenizer, prompt_file, gold=GOLD)
    b = evaluate(policy, demo_tokenizer, prompt_file, gold=GOLD)
    assert a == b
    assert a["n_prompts"] == 4 and a["n_samples"] == 12
    assert len(a["examples"]) == 3 and a["examples"][0]["prompt"].startswith("<|user|> review the phone .")
    c = evaluate(
        policy,
        demo_tokenizer,
        prompt_file,
        gold=GOLD,
        sampling=SamplingSpec(**{**vars(SAMPLING), "seed": 99}),
    )
    assert [e["response"] for e in c["examples"]] != [e["response"] for e in a["examples"]]
    # the gold numbers are those of the examples' own texts
    from lightning_rlhf.demo.reviews import gold_reward

    for e in a["examples"]:
        prompt = e["prompt"].removeprefix("<|user|> ").removesuffix(" <|assistant|> ")
        assert e["gold_reward"] == gold_reward(prompt, e["response"])
    assert -1.0 <= a["gold_reward"]["mean"] <= 1.0


def test_kl_to_itself_is_zero_and_to_another_model_positive(policy, other, demo_tokenizer, prompt_file):
    same = evaluate(policy, demo_tokenizer, prompt_file, reference=policy)
    # sampled log-probs (decode steps) and the reference forward (whole rows) agree to float round-off
    assert abs(same["kl_to_ref"]) < 1e-6
    diff = evaluate(policy, demo_tokenizer, prompt_file, reference=other)
    assert diff["kl_to_ref"] > 0.5
    # the reference does not change what is sampled
    assert diff["examples"] == same["examples"]


def test_kl_estimate_matches_exact_kl_in_expectation(policy, other, demo_tokenizer, prompt_file):
    """One generated token: the sample mean of log p - log q is close to the exact KL(p || q)."""
    sampling = SamplingSpec(max_new_tokens=1, num_samples=400, batch_size=4, seed=0)
    res = evaluate(policy, demo_tokenizer, prompt_file, reference=other, sampling=sampling)
    from lightning_rlhf.evaluation import prompt_loader

    batch = next(iter(prompt_loader(str(prompt_file), demo_tokenizer, batch_size=4)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = mask.sum(1) - 1
    with torch.no_grad():
        lp = policy(input_ids=ids, attention_mask=mask).logits[torch.arange(4), last].double().log_softmax(-1)
        lq = other(input_ids=ids, attention_mask=mask).logits[torch.arange(4), last].double().log_softmax(-1)
    ratio = lp - lq  # (4, V)
    exact = (lp.exp() * ratio).sum(-1)  # (4,) KL per prompt
    var = (lp.exp() * (ratio - exact[:, None]) ** 2).sum(-1)  # (4,) variance of one sample's log-ratio
    stderr = math.sqrt(float(var.sum()) / 16 / sampling.num_samples)  # of the mean over 4 x 400 samples
    assert float(exact.mean()) > 10 * stderr
    assert abs(res["kl_to_ref"] - float(exact.mean())) < 4 * stderr


def every_other_none(prompts, completions, **_):
    return [1.0 if i % 2 == 0 else None for i in range(len(completions))]


def always_none(prompts, completions, **_):
    return [None] * len(completions)


def answer_is_here(prompts, completions, answer, **_):
    """Uses an extra column of the prompt records (TRL passes them as keyword arguments)."""
    return [float(a == "here") for a in answer]


def test_gold_functions_with_none_and_extra_columns(policy, demo_tokenizer, tmp_path, write_jsonl):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": [{"role": "user", "content": f"review the {p} ."}], "answer": a}
         for p, a in [("phone", "here"), ("lamp", "there"), ("bag", "here")]],
    )  # fmt: skip
    fns = [every_other_none, always_none, answer_is_here]
    res = evaluate(
        policy, demo_tokenizer, prompts, gold=fns, sampling=SamplingSpec(max_new_tokens=4, num_samples=2)
    )
    assert res["gold_reward"] == res["gold/every_other_none"] == {"mean": 1.0, "std": 0.0}
    assert math.isnan(res["gold/always_none"]["mean"])
    # 2 of 3 prompts say "here": 4 of 6 samples score 1
    assert res["gold/answer_is_here"]["mean"] == pytest.approx(4 / 6)
    assert res["n_samples"] == 6
    assert res["examples"][1]["every_other_none"] == 1.0 and res["examples"][1]["always_none"] is None
    # by import path, under a name of one's choosing
    named = evaluate(policy, demo_tokenizer, prompts, gold={"here": f"{__name__}.answer_is_here"},
                     sampling=SamplingSpec(max_new_tokens=4, num_samples=2))  # fmt: skip
    assert named["gold_reward"] == res["gold/answer_is_here"]


def test_proxy_reward_from_a_reward_model(policy, demo_tokenizer, prompt_file, tiny_model_dir):
    rm = load_sequence_classifier(str(tiny_model_dir), trainable=False)
    res = evaluate(policy, demo_tokenizer, prompt_file, reward_model=rm)
    assert set(res["proxy_reward"]) == {"mean", "std"} and math.isfinite(res["proxy_reward"]["mean"])
    assert res["proxy_reward"]["std"] > 0  # one score per sample, not a constant


def test_completion_loss_equals_a_hand_loop(policy, demo_tokenizer, memo_sft_file, memo_records):
    def ids(text):
        return demo_tokenizer(text, add_special_tokens=False)["input_ids"]

    total, count = 0.0, 0
    for r in memo_records:
        p = ids(demo_tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True))
        full = ids(demo_tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False))
        with torch.no_grad():
            logp = policy(input_ids=torch.tensor([full])).logits[0].double().log_softmax(-1)
        for t in range(len(p), len(full)):  # completion tokens incl. EOS, each predicted from t - 1
            total -= float(logp[t - 1, full[t]])
            count += 1
    want = total / count
    # uneven batches (3, 3, 2) with padding: still the token mean over the whole file
    assert completion_loss(policy, demo_tokenizer, str(memo_sft_file), batch_size=3) == pytest.approx(
        want, rel=1e-5
    )
    assert completion_loss(policy, demo_tokenizer, str(memo_sft_file), batch_size=8) == pytest.approx(
        want, rel=1e-5
    )


def test_completion_loss_restores_training_mode(tiny_model_dir, demo_tokenizer, memo_sft_file):
    model = load_causal_lm(str(tiny_model_dir))
    assert model.training
    completion_loss(model, demo_tokenizer, str(memo_sft_file))
    assert model.training
