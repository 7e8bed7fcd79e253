"""GRPO/RLOO prompt sharing: one row ``[prompt, r_1, ..., r_G]`` per prompt group gives the separate
rows' response log-probs, entropies and parameter gradients.

Rollout layout: ragged prompts (left padding), responses cut short by EOS, rows of a group scattered
over the micro-batch (shuffled), groups of 3, 2 and 1 rows; three families (Llama: rotary; GPT-2 and
OPT: learned absolute positions, OPT with an offset), sdpa and eager attention, fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, V, build, ragged_rollout
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_rlhf.core.prefix import PROMPT, attention_allowed, group_rows, share_prompt_groups
from lightning_rlhf.rollout.generate import Rollout


def grouped_rollout(seed: int = 0, response_len: tuple[int, ...] = (8, 2, 8, 1, 3, 6)) -> Rollout:
    """6 rows, shuffled: prompt A (4 tokens) x3, prompt B (2 tokens) x2, prompt C (5 tokens) x1;
    responses of 1..8 tokens (some stopped early), prompts left-padded to 5, responses right-padded to 8."""
    g = torch.Generator().manual_seed(seed)
    prompts = {"A": torch.randint(1, V, (4,), generator=g), "B": torch.randint(1, V, (2,), generator=g),
               "C": torch.randint(1, V, (5,), generator=g)}  # fmt: skip
    order = ["A", "B", "C", "A", "B", "A"]
    return ragged_rollout([prompts[k] for k in order], list(response_len), [0, 1, 2, 0, 1, 0], g)


def test_groups_found_by_content_in_any_order():
    ro = grouped_rollout()
    assert group_rows(ro.prompt_ids, ro.prompt_mask) == [[0, 3, 5], [1, 4], [2]]
    # no two rows share a prompt: nothing to share
    assert group_rows(ro.prompt_ids[:3], ro.prompt_mask[:3]) is None
    assert share_prompt_groups(ro.prompt_ids[:3], ro.prompt_mask[:3], ro.response_ids[:3], ro.response_mask[:3]) is None


def test_shared_rows_match_a_per_token_loop():
    """Every response token of every row: its column's next token is that token, it sits at its own
    position, and it sees exactly its prompt's real tokens and its own earlier response tokens."""
    ro = grouped_rollout()
    s = share_prompt_groups(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask, pad_value=0)
    allowed = attention_allowed(s.segment)[:, 0]  # (B', L, L)
    assert s.input_ids.shape[0] == 3 and s.prompt_width == 5
    assert s.input_ids.shape[1] == 5 + 8 + 1 + 6  # group A: prompt columns + its three responses
    for i in range(len(ro)):
        g = int(s.group[i])
        prompt = ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist()
        p = len(prompt)
        seq = prompt + []  # the separate row's tokens so far
        for k in range(int(ro.response_mask[i].sum())):
            c = int(s.column[i, k])  # the column predicting token k
            if k == 0:
                assert c == 4 and s.input_ids[g, c] == prompt[-1] and s.position_ids[g, c] == p - 1
            else:
                assert s.input_ids[g, c + 1] == ro.response_ids[i, k]
            seq.append(int(ro.response_ids[i, k]))
            # the query predicting token k: what it sees must be exactly the separate row up to it
            seen = [int(s.input_ids[g, j]) for j in range(s.input_ids.shape[1]) if allowed[g, c, j]]
            assert seen == seq[:-1], (i, k)
            seen_pos = [int(s.position_ids[g, j]) for j in range(s.input_ids.shape[1]) if allowed[g, c, j]]
            assert seen_pos == list(range(p + k)), (i, k)
    # padding: every query sees at least itself; prompt padding is invisible to real tokens
    assert bool(allowed.any(-1).all())
    real = s.attention_mask.bool()
    assert not bool((allowed & real[:, :, None] & ~real[:, None, :]).any())
    assert bool((s.segment[s.attention_mask.bool() & (torch.arange(s.input_ids.shape[1]) < 5)] == PROMPT).all())


def _separate_and_shared(model, ro, padding_free: bool):
    out, rows = {}, []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp, ent = ro.response_logprobs(model, 0.7, return_entropy=True, padding_free=padding_free, share_prompt=share)
        ((lp * torch.linspace(0.5, 1.5, lp.numel()).view_as(lp)).sum() + ent.sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[share] = (lp.detach(), ent.detach(), grads)
    hook.remove()
    return out, rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_shared_equals_separate_rows(family, attn, padding_free):
    model = build(family, attn).float()
    # padding_free: group C's short response lets B and C share a packed row (2 forward rows, not 3)
    ro = grouped_rollout(response_len=(8, 2, 2, 1, 3, 6) if padding_free else (8, 2, 8, 1, 3, 6))
    out, rows = _separate_and_shared(model, ro, padding_free)
    assert rows[-1] == (2 if padding_free else 3)  # the shared forward's rows: packed / one per group
    (lp0, ent0, g0), (lp1, ent1, g1) = out[False], out[True]
    mask = ro.response_mask.bool()
    assert bool((lp1[~mask] == 0).all()) and bool((ent1[~mask] == 0).all())
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-4, msg=k)
    # the log-probs are real numbers of the right size (not a trivially equal 0)
    assert bool((lp0[mask] < 0).all())


def test_shared_rows_compute_fewer_tokens():
    ro = grouped_rollout()
    s = share_prompt_groups(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    separate = int(ro.prompt_mask.sum() + ro.response_mask.sum())
    assert int(s.attention_mask.sum()) == separate - 2 * 4 - 1 * 2  # A's prompt twice and B's once saved


def test_model_without_4d_mask_scores_rows_apart():
    """An attention implementation that takes no 4D mask: the separate rows (same numbers)."""
    model = build("llama", "sdpa").float()
    ro = grouped_rollout()
    ref, _ = ro.response_logprobs(model, 1.0)
    model.config._attn_implementation = "flash_attention_2"  # only read by shared_prompt_mask here
    from lightning_rlhf.models.forward import grouped_response_logprobs

    s = share_prompt_groups(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    assert grouped_response_logprobs(model, s, ro.response_ids) is None
    model.config._attn_implementation = "sdpa"
    got, _ = ro.response_logprobs(model, 1.0, share_prompt=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_shorter_than_the_shared_row_scores_rows_apart():
    """One mask for every layer would drop a sliding window: a window shorter than the shared row
    runs the separate rows (the model's own window), same numbers as without the option."""
    from lightning_rlhf.models.forward import grouped_response_logprobs

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=V, pad_token_id=0, sliding_window=12, **FAMILIES["llama"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ro = grouped_rollout()
    s = share_prompt_groups(ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    assert s.input_ids.shape[1] > 12
    assert grouped_response_logprobs(model, s, ro.response_ids) is None
    ref, _ = ro.response_logprobs(model, 1.0)
    got, _ = ro.response_logprobs(model, 1.0, share_prompt=True)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
