"""core.packing: packed rows against an independent per-token loop (layout, positions, mask, scatter)."""

import torch

from lightning_rlhf.core.packing import gather_packed, pack, pack_rows, unpack
from lightning_rlhf.core.prefix import attention_allowed, share_prompt


def ragged(lengths_left, lengths_right, width_left, width_right, seed=0):
    """Left-padded prompts then right-padded responses (the rollout layout): ids, mask (N, T)."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths_left)
    ids = torch.randint(1, 50, (n, width_left + width_right), generator=g)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(lengths_left, lengths_right, strict=True)):
        mask[i, width_left - p : width_left + r] = 1
    return ids.masked_fill(mask == 0, 0), mask


def slow_check(ids, mask, packing, positions, allowed_rows):
    """Every packed slot against the original rows, one token at a time."""
    n, t = ids.shape
    seen = set()
    b, width = packing.input_ids.shape
    for r in range(b):
        for q in range(width):
            s = int(packing.source[r, q])
            if s < 0:  # padding: sees itself only
                assert packing.allowed[r, 0, q].tolist() == [k == q for k in range(width)]
                continue
            i, c = divmod(s, t)
            assert mask[i, c] == 1 and s not in seen
            seen.add(s)
            assert packing.input_ids[r, q] == ids[i, c]
            assert packing.position_ids[r, q] == positions[i, c]
            for k in range(width):
                sk = int(packing.source[r, k])
                expect = sk >= 0 and sk // t == i and bool(allowed_rows(i, c, sk % t))
                assert bool(packing.allowed[r, 0, q, k]) == expect, (r, q, k)
    assert len(seen) == int(mask.sum())  # every real token exactly once


def test_pack_rows_matches_a_per_token_loop_for_ragged_rollout_rows():
    ids, mask = ragged([3, 1, 4, 2, 4], [5, 1, 2, 6, 1], 4, 6)
    packing = pack_rows(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    slow_check(ids, mask, packing, positions, lambda i, q, k: k <= q)
    # capacity = the longest row (10 tokens): 8+... FFD puts 10 | 8+2 | 6+5 -> 4 rows at most
    assert packing.input_ids.shape[1] <= int(mask.sum(-1).max())
    assert packing.input_ids.shape[0] < ids.shape[0]


def test_kept_tokens_sit_last_and_unpack_puts_them_back():
    ids, mask = ragged([3, 1, 4, 2], [5, 1, 2, 6], 4, 6)
    keep = mask.bool().clone()
    keep[:, :4] = False  # the responses only
    packing = pack_rows(ids, mask, 20, keep=keep)
    width = packing.input_ids.shape[1]
    # every kept token is among the last `keep` columns of its packed row
    kept_flat = set(torch.arange(ids.numel()).view_as(ids)[keep].tolist())
    for r in range(packing.source.shape[0]):
        for q in range(width):
            if int(packing.source[r, q]) in kept_flat:
                assert q >= width - packing.keep
    # a per-token value (the source index itself) goes back to its own (i, t); fill elsewhere
    values = packing.source[:, width - packing.keep :].float()  # (B', K)
    back = unpack(values, packing, fill=-7.0)
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            expect = i * ids.shape[1] + t if keep[i, t] else -7.0
            assert back[i, t] == expect
    # gather_packed is the inverse direction: the ids
    assert torch.equal(gather_packed(ids, packing, fill=0), packing.input_ids)


def test_unpack_is_differentiable():
    ids, mask = ragged([2, 3], [3, 1], 3, 3)
    packing = pack_rows(ids, mask, 100)
    x = torch.randn(packing.input_ids.shape[0], packing.keep, 2, requires_grad=True)
    out = unpack(x, packing)  # (N, T, 2)
    out.sum().backward()
    # each kept slot is used once, padding slots not at all
    used = (packing.source[:, -packing.keep :] >= 0).float()[..., None].expand_as(x)
    assert torch.equal(x.grad, used)


def test_shared_prompt_rows_keep_their_positions_and_mask():
    # two pairs: prompt + chosen rows, then prompt + rejected rows, right-padded
    g = torch.Generator().manual_seed(1)
    rows = [(3, 2), (1, 4), (3, 3), (1, 1)]  # (prompt, completion) of chosen 0, 1, rejected 0, 1
    t = 7
    ids = torch.zeros(4, t, dtype=torch.long)
    attn, loss = torch.zeros_like(ids), torch.zeros_like(ids)
    prompts = [torch.randint(1, 50, (3,), generator=g), torch.randint(1, 50, (1,), generator=g)]
    for i, (p, c) in enumerate(rows):
        ids[i, :p] = prompts[i % 2]
        ids[i, p : p + c] = torch.randint(1, 50, (c,), generator=g)
        attn[i, : p + c], loss[i, p : p + c] = 1, 1
    shared = share_prompt(ids, attn, loss)
    real = shared.segment != 3
    allowed = attention_allowed(shared.segment)
    packing = pack_rows(shared.input_ids, real, position_ids=shared.position_ids, allowed=allowed)
    slow_check(shared.input_ids, real.long(), packing, shared.position_ids, lambda i, q, k: allowed[i, 0, q, k])


def test_pack_is_deterministic_first_fit_decreasing():
    assert pack([3, 5, 2, 5, 1], 6) == [[1, 4], [3], [0, 2]]
    assert pack([3, 5, 2, 5, 1], 6, "greedy") == [[0], [1], [2], [3, 4]]
