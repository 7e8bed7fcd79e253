"""core.prefix: one ``[prompt, chosen, rejected]`` row per preference pair, checked against a loop."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.core.prefix import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    additive_mask,
    attention_allowed,
    completion_columns,
    last_positions,
    share_prompt,
)

# (prompt, chosen, rejected) token ids; ragged on every part
PAIRS = [
    ([5, 6, 7], [8, 9], [10, 11, 12, 13]),
    ([5], [14, 15, 16, 17, 18], [19]),
    ([20, 21, 22, 23, 24], [25], [26, 27]),
]
PAD_ID = 99


def preference_batch(pairs=PAIRS):
    """The collator's layout: rows [:B] prompt + chosen, rows [B:] prompt + rejected, right-padded."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    prompts = [len(p) for p, _, _ in pairs] * 2
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), PAD_ID)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    loss = torch.zeros(len(rows), t, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        loss[i, p : len(row)] = 1
    return ids, mask, loss


def test_rows_hold_prompt_chosen_rejected_with_restarting_positions():
    shared = share_prompt(*preference_batch(), pad_value=PAD_ID)
    width = max(len(p) + len(c) + len(r) for p, c, r in PAIRS)
    assert shared.input_ids.shape == (3, width)
    for i, (p, c, r) in enumerate(PAIRS):
        n = len(p) + len(c) + len(r)
        assert shared.input_ids[i].tolist() == p + c + r + [PAD_ID] * (width - n)
        positions = list(range(len(p) + len(c))) + list(range(len(p), len(p) + len(r)))
        assert shared.position_ids[i, :n].tolist() == positions
        seg = [PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(r) + [PAD] * (width - n)
        assert shared.segment[i].tolist() == seg
        assert (shared.prompt_len[i], shared.chosen_len[i], shared.rejected_len[i]) == (len(p), len(c), len(r))


def test_attention_mask_matches_what_each_token_sees_in_its_own_sequence():
    shared = share_prompt(*preference_batch(), pad_value=PAD_ID)
    allowed = attention_allowed(shared.segment)
    width = shared.input_ids.shape[1]
    assert allowed.shape == (3, 1, width, width)
    for i, (p, c, r) in enumerate(PAIRS):
        # index of each row token in its own sequence (prompt+chosen or prompt+rejected), and which one
        own = [("c", j) for j in range(len(p) + len(c))] + [("r", len(p) + j) for j in range(len(r))]
        for q in range(len(own)):
            for k in range(len(own)):
                sq, jq = own[q]
                sk, jk = own[k]
                sees = jk <= jq and (jk < len(p) or sk == sq)  # same sequence (the prompt is in both), causal
                assert bool(allowed[i, 0, q, k]) == sees, (i, q, k)
        assert allowed[i, 0].any(-1).all()  # every query (padding too) sees something: no NaN softmax


def test_columns_pick_each_completion_token_once_and_the_branch_the_first_rejected():
    shared = share_prompt(*preference_batch(), pad_value=PAD_ID)
    chosen, rejected, branch_col, branch_label = completion_columns(shared)
    ids = shared.input_ids
    for i, (p, c, r) in enumerate(PAIRS):
        labels_c = ids[i, 1:][chosen[i]].tolist()
        labels_r = ids[i, 1:][rejected[i]].tolist()
        assert labels_c == c
        assert [int(branch_label[i])] + labels_r == r
        assert int(branch_col[i]) == len(p) - 1
    end_c, end_r = last_positions(shared)
    for i, (p, c, r) in enumerate(PAIRS):
        assert ids[i, end_c[i]] == c[-1] and ids[i, end_r[i]] == r[-1]
        assert (int(end_c[i]), int(end_r[i])) == (len(p) + len(c) - 1, len(p) + len(c) + len(r) - 1)


def test_additive_mask_is_zero_where_allowed_and_lowest_elsewhere():
    allowed = attention_allowed(share_prompt(*preference_batch()).segment)
    m = additive_mask(allowed, torch.float32)
    assert torch.equal(m == 0, allowed)
    assert (m[~allowed] == torch.finfo(torch.float32).min).all()


def test_a_pair_without_prompt_shares_nothing():
    ids, mask, loss = preference_batch([([], [8, 9], [10]), ([5], [6], [7])])
    assert share_prompt(ids, mask, loss) is None


def test_bad_batches_raise():
    ids, mask, loss = preference_batch()
    other = ids.clone()
    other[4, 0] = 42  # pair 1's rejected row has another prompt
    with pytest.raises(ValueError, match=r"pairs \[1\] have different prompts"):
        share_prompt(other, mask, loss)
    with pytest.raises(ValueError, match="even number"):
        share_prompt(ids[:5], mask[:5], loss[:5])
    left = loss.clone()
    left[0, -1] = 1  # a completion token on padding
    with pytest.raises(ValueError, match="right-padded"):
        share_prompt(ids, mask, left)
