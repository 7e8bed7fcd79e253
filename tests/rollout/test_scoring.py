"""Scorers: last-token reward-model scores (pad == eos), reward functions, composition."""

import functools
import math
import textwrap
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from lightning_rlhf.rollout import (
    CompositeScorer,
    RewardFunctionScorer,
    RewardModelScorer,
    generate,
    last_token_scores,
)

EOS = 1


def config(pad_token_id=EOS) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=pad_token_id,
                       eos_token_id=EOS)


def reward_model(seed: int = 0, pad_token_id=EOS) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config(pad_token_id)).eval()


def sequences_ending_in_eos() -> list[torch.Tensor]:
    """Examples whose last real token is EOS, the case where pad == eos fools transformers' pooling."""
    g = torch.Generator().manual_seed(0)
    return [torch.cat([torch.randint(2, 64, (n,), generator=g), torch.tensor([EOS])]) for n in (3, 8, 5)]


def right_padded(seqs, pad):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def unpadded_scores(model, seqs) -> torch.Tensor:
    """One example at a time, no padding: transformers' pooling then reads the last token (pad_id None
    pools at -1; with pad == eos it would pick an earlier token, so the per-example reference takes the
    head output itself)."""
    out = []
    for s in seqs:
        hidden = model.model(input_ids=s[None]).last_hidden_state
        out.append(model.score(hidden[0, -1]).squeeze())
    return torch.stack(out)


@pytest.mark.parametrize("pad", [EOS, 0, None], ids=["pad_eq_eos", "pad_0", "no_pad_id"])
def test_last_token_scores_match_unpadded_forward(pad):
    model = reward_model(pad_token_id=pad)
    seqs = sequences_ending_in_eos()
    ids, mask = right_padded(seqs, EOS if pad is None else pad)
    with torch.no_grad():
        scores = last_token_scores(model, ids, mask)
        ref = unpadded_scores(model, seqs)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
    if pad == EOS:  # transformers' own pooling gets this case wrong; we must not
        with torch.no_grad():
            hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert not torch.allclose(hf, ref, atol=1e-3)


def test_last_token_scores_left_padded_and_keeps_gradients():
    model = reward_model()
    seqs = sequences_ending_in_eos()
    width = max(len(s) for s in seqs)
    ids = torch.full((3, width), EOS)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    scores = last_token_scores(model, ids, mask)  # position ids default to the mask's cumsum
    torch.testing.assert_close(scores, unpadded_scores(model, seqs).detach(), atol=1e-5, rtol=0)
    scores.sum().backward()
    assert model.score.weight.grad is not None and model.model.embed_tokens.weight.grad is not None


def test_last_token_scores_with_lora_reward_model():
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(reward_model(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4,
                                                      target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    seqs = sequences_ending_in_eos()
    ids, mask = right_padded(seqs, EOS)
    scores = last_token_scores(model, ids, mask)
    inner = model.get_base_model()
    with torch.no_grad():
        ref = torch.stack([inner.score(inner.model(input_ids=s[None]).last_hidden_state[0, -1]).squeeze() for s in seqs])
    torch.testing.assert_close(scores.detach(), ref, atol=1e-5, rtol=0)
    scores.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@functools.cache
def make_rollout(num_samples=2):
    """4 rows: 2 prompts x 2 samples (cached: scorers never modify a rollout)."""
    torch.manual_seed(1)
    policy = LlamaForCausalLM(config())
    ids, mask = right_padded([torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12])], EOS)
    return generate(policy, ids, mask, max_new_tokens=6, num_samples=num_samples, eos_token_id=EOS, pad_token_id=EOS,
                    generator=torch.Generator().manual_seed(0))


def test_reward_model_scorer_reads_last_response_token_and_batches():
    rollout = make_rollout()
    model = reward_model()
    rewards, parts = RewardModelScorer(model)(rollout, [""] * 4, [""] * 4, [{}] * 4)
    chunked, _ = RewardModelScorer(model, batch_size=3)(rollout, [""] * 4, [""] * 4, [{}] * 4)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32 and not rewards.requires_grad
    torch.testing.assert_close(chunked, rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts["reward_model"], rewards)
    full = [torch.cat([p[pm.bool()], r[rm.bool()]]) for p, pm, r, rm in zip(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, strict=True)]
    with torch.no_grad():
        torch.testing.assert_close(rewards, unpadded_scores(model, full), atol=1e-5, rtol=0)


# --- reward functions --------------------------------------------------------------------------


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def answer_reward(prompts, completions, answer, **kwargs):
    """Not applicable (None) where the row has no answer."""
    return [None if a is None else float(c == a) for c, a in zip(completions, answer, strict=True)]


ROWS = dict(
    prompts=["p0", "p0", "p1", "p1"],
    completions=["4", "5", "abc", "x"],
    extra=[{"answer": "4"}, {"answer": "4"}, {"topic": "t"}, {"topic": "t"}],
)


def test_reward_functions_columns_none_and_weights():
    rollout = make_rollout()
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [0.0] * len(completions)

    scorer = RewardFunctionScorer([length_reward, answer_reward, spy], weights=[0.5, 2.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every row has an applicable function: no warning
        rewards, parts = scorer(rollout, **ROWS)
    # columns: union of keys, as lists with one entry per row, None where a row lacks the key
    assert seen["columns"] == {"answer": ["4", "4", None, None], "topic": [None, None, "t", "t"]}
    assert seen["prompts"] == ROWS["prompts"] and seen["completions"] == ROWS["completions"]
    # 0.5 * len + 2.0 * (c == answer, None -> 0)
    assert rewards.tolist() == [0.5 * 1 + 2.0, 0.5 * 1, 0.5 * 3, 0.5 * 1]
    assert parts["length_reward"].tolist() == [1.0, 1.0, 3.0, 1.0]
    ans = parts["answer_reward"].tolist()
    assert ans[:2] == [1.0, 0.0] and math.isnan(ans[2]) and math.isnan(ans[3])  # None reported as NaN


def test_all_none_row_warns_and_scores_zero():
    scorer = RewardFunctionScorer([answer_reward])
    with pytest.warns(UserWarning, match=r"rows \[2, 3\]"):
        rewards, _ = scorer(make_rollout(), **ROWS)
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_reward_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shout(prompts, completions, **kw):
            return [1.0 if c.isupper() else -1.0 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards, parts = RewardFunctionScorer(["my_rewards.shout", "my_rewards:shout"], weights=[1.0, 2.0])(
        make_rollout(), **ROWS
    )
    assert rewards.tolist() == [-3.0, -3.0, -3.0, -3.0]
    assert set(parts) == {"shout_0", "shout_1"}  # duplicate names made unique
    with pytest.raises(ValueError, match="no callable 'nope'"):
        RewardFunctionScorer(["my_rewards.nope"])
    with pytest.raises(ValueError, match="cannot import"):
        RewardFunctionScorer(["no_such_module_xyz.f"])


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda prompts, completions, **kw: [1.0], r"'bad' returned 1 values for 4 completions"),
        (lambda prompts, completions, **kw: ["1.0"] * 4, r"'bad' returned '1.0' \(str\) at position 0"),
        (lambda prompts, completions, **kw: 3.0, r"'bad' returned float"),
    ],
    ids=["wrong_count", "not_a_number", "not_a_list"],
)
def test_bad_reward_function_output_names_the_function(fn, match):
    fn.__name__ = "bad"
    with pytest.raises(ValueError, match=match):
        RewardFunctionScorer([fn])(make_rollout(), **ROWS)


def test_scorer_rejects_rows_that_do_not_match_the_rollout():
    with pytest.raises(ValueError, match="one of each per rollout row"):
        RewardFunctionScorer([length_reward])(make_rollout(), ["p"], ["c"], [{}])
    with pytest.raises(ValueError, match="2 weights for 1"):
        RewardFunctionScorer([length_reward], weights=[1.0, 2.0])


def test_composite_scorer_weights_and_parts():
    rollout = make_rollout()
    rm = RewardModelScorer(reward_model())
    fns = RewardFunctionScorer([length_reward])
    rewards, parts = CompositeScorer([rm, fns], weights=[1.0, -0.25])(rollout, **ROWS)
    rm_rewards, _ = rm(rollout, **ROWS)
    torch.testing.assert_close(rewards, rm_rewards - 0.25 * torch.tensor([1.0, 1.0, 3.0, 1.0]))
    assert set(parts) == {"reward_model", "length_reward"}


def test_a_reward_function_that_raises_is_named_with_the_batch():
    from lightning_rlhf.errors import RewardFunctionError

    def needs_answer(prompts, completions, answer, **kw):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    scorer = RewardFunctionScorer([length_reward, needs_answer])
    rows = dict(ROWS, extra=[{"topic": "t"}] * 4)  # no `answer` column
    with pytest.raises(RewardFunctionError) as e:
        scorer(make_rollout(), **rows)
    msg = str(e.value)
    assert msg.startswith("reward function 'needs_answer' raised TypeError:")
    assert f"({__name__}.needs_answer, scoring call 1: 4 completions, first prompt 'p0'; arguments: " \
           "prompts, completions, topic)" in msg
    # the second batch is named as such
    with pytest.raises(RewardFunctionError, match="scoring call 2: 4 completions"):
        scorer(make_rollout(), **rows)


@pytest.mark.parametrize("bad", [math.nan, math.inf, True])
def test_a_non_finite_or_boolean_reward_is_rejected(bad):
    def f(prompts, completions, **kw):
        return [0.0, bad, 0.0, 0.0]

    with pytest.raises(ValueError, match=r"reward function 'f' returned .* at position 1; expected a (finite )?float"):
        RewardFunctionScorer([f])(make_rollout(), **ROWS)
