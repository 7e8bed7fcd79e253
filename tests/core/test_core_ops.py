"""Tests for lightning_rlhf.core.ops: masked reductions, log-probs and entropy from logits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rlhf.core import entropy_from_logits, logprobs_from_logits, masked_mean, masked_sum, masked_var

FAST = settings(max_examples=25, deadline=None)


def _random_mask(B, T, gen):
    """Right-padded mask with lengths in [0, T], including an all-masked row and a length-1 row."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = 0
    if B > 1:
        lengths[1] = 1
    return torch.arange(T)[None, :] < lengths[:, None]


# ---------------------------------------------------------------- masked reductions


def _ref_masked_stats(x, mask):
    """Python loop: per row (sum, mean, unbiased var, biased var) and the global ones."""
    rows = []
    everything = []
    for i in range(x.shape[0]):
        vals = [float(x[i, t]) for t in range(x.shape[1]) if mask[i, t]]
        everything += vals
        rows.append(vals)

    def stats(vals):
        n = len(vals)
        s = sum(vals)
        mean = s / n if n else 0.0
        ss = sum((v - mean) ** 2 for v in vals)
        return s, mean, (ss / (n - 1) if n > 1 else 0.0), (ss / n if n else 0.0)

    return [stats(r) for r in rows], stats(everything)


def test_masked_reductions_match_python_loop_with_empty_and_single_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    mask = _random_mask(6, 7, gen)
    per_row, glob = _ref_masked_stats(x, mask)
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(glob[0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(glob[1], dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(glob[2], dtype=torch.float64))
    torch.testing.assert_close(
        masked_var(x, mask, unbiased=False), torch.tensor(glob[3], dtype=torch.float64)
    )
    for k, fn in enumerate([masked_sum, masked_mean]):
        torch.testing.assert_close(
            fn(x, mask, dim=-1), torch.tensor([r[k] for r in per_row], dtype=torch.float64)
        )
    torch.testing.assert_close(
        masked_var(x, mask, dim=-1), torch.tensor([r[2] for r in per_row], dtype=torch.float64)
    )


def test_masked_ops_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(x, mask).item() == 3.0  # 1 + 2
    assert masked_mean(x, mask).item() == 1.5  # 3 / 2
    assert masked_mean(x, mask, dim=-1).tolist() == [1.5, 0.0]  # empty row -> 0, not NaN
    assert masked_var(x, mask).item() == 0.5  # ((1-1.5)^2 + (2-1.5)^2) / (2-1)
    assert masked_var(x, mask, unbiased=False).item() == 0.25  # same / 2
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_ops_ignore_nan_and_inf_in_padding_and_give_it_zero_grad():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), float("-inf")]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = masked_mean(x, mask) + masked_var(x, mask) + masked_sum(x, mask, dim=-1).sum()
    assert torch.isfinite(out)
    out.backward()
    assert torch.all(x.grad[~mask] == 0)
    assert torch.all(torch.isfinite(x.grad))


@FAST
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(-1e6, 1e6))
def test_masked_ops_do_not_depend_on_padding_values(B, T, seed, pad_value):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.6
    y = torch.where(mask, x, torch.full_like(x, pad_value))
    for fn in (masked_sum, masked_mean):
        assert torch.equal(fn(x, mask), fn(y, mask))
        assert torch.equal(fn(x, mask, dim=-1), fn(y, mask, dim=-1))
    torch.testing.assert_close(masked_var(x, mask), masked_var(y, mask))


# ---------------------------------------------------------------- log-probs


def _ref_logprobs(logits, labels):
    """Independent slow version: float64 log_softmax + gather."""
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_logprobs_match_log_softmax_gather_on_a_strided_view(chunk_size):
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(3, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    logits = full[:, :-1]  # non-contiguous (B, T-1, V) view, as in a next-token loss
    lp = logprobs_from_logits(logits, labels[:, 1:], chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    torch.testing.assert_close(lp.double(), _ref_logprobs(logits, labels[:, 1:]), atol=1e-6, rtol=1e-6)


def test_logprobs_gradient_matches_autograd_of_reference():
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(2, 5, 9, generator=gen, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4), generator=gen)
    g = torch.randn(2, 4, generator=gen)
    (logprobs_from_logits(full[:, 1:], labels, chunk_size=3) * g).sum().backward()
    ours = full.grad.clone()
    full.grad = None
    (_ref_logprobs(full[:, 1:], labels) * g.double()).sum().backward()
    torch.testing.assert_close(ours, full.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(ours[:, 0] == 0)  # the unused first position gets no gradient


def test_logprobs_from_bf16_are_computed_in_fp32():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 8, 50, generator=gen) * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (4, 8), generator=gen)
    lp = logprobs_from_logits(logits, labels)
    assert lp.dtype == torch.float32
    # the reference sees exactly the same bf16 values, upcast: only fp32 rounding differs
    torch.testing.assert_close(lp.double(), _ref_logprobs(logits.detach(), labels), atol=1e-5, rtol=1e-5)
    # whereas a log_softmax in bf16 is visibly worse
    bf16_naive = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert (bf16_naive.double() - _ref_logprobs(logits.detach(), labels)).abs().max() > 1e-3
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_logprobs_keep_no_fp32_copy_of_bf16_logits_for_backward():
    """Autograd saves only the bf16 logits, labels and one fp32 scalar per row."""
    logits = torch.randn(4, 16, 1000).bfloat16().requires_grad_()
    labels = torch.randint(0, 1000, (4, 16))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_from_logits(logits, labels)
    logits_bytes = logits.numel() * logits.element_size()
    assert sum(saved) <= logits_bytes + labels.numel() * 8 + 4 * 64 * 4
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])
    assert sum(saved) >= 2 * logits_bytes  # the naive way keeps an fp32 (B, T, V) for backward


def test_logprobs_with_large_logits_where_a_naive_softmax_overflows():
    logits = torch.tensor([[[1000.0, 999.0, -1000.0]], [[-5e4, -5e4 - 3.0, 0.0]]])  # (2, 1, 3)
    labels = torch.tensor([[1], [0]])
    naive = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)).gather(
        -1, labels[..., None]
    )
    assert not torch.isfinite(naive).all()
    lp = logprobs_from_logits(logits, labels)
    # by hand: log(e^-1 / (1 + e^-1)) = -1 - log(1 + e^-1) = -1.3133 (to fp32's 6e-5 spacing at 1000)
    assert lp[0, 0].item() == pytest.approx(-1 - math.log1p(math.exp(-1)), abs=1e-4)
    torch.testing.assert_close(lp.double(), _ref_logprobs(logits, labels), atol=1e-3, rtol=1e-6)


def test_logprobs_temperature_and_ignore_index():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    labels[1, 2] = -100
    lp = logprobs_from_logits(logits, labels, temperature=0.7)
    ref = _ref_logprobs(logits / 0.7, labels.clamp(min=0))
    assert lp[1, 2].item() == 0.0
    torch.testing.assert_close(lp[:1].double(), ref[:1], atol=1e-6, rtol=1e-6)
    lp.sum().backward()
    assert torch.all(logits.grad[1, 2] == 0)
    ours = logits.grad.clone()
    logits.grad = None
    ref[labels >= 0].sum().backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels[:, :2])


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 20), st.integers(0, 2**31 - 1), st.floats(-1e3, 1e3)
)
def test_logprobs_normalise_and_are_shift_invariant(B, T, V, seed, shift):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 5
    all_labels = torch.arange(V).expand(B, T, V)
    # log-probs of every label, one call per label: they must sum (in prob space) to 1
    lps = torch.stack([logprobs_from_logits(logits, all_labels[..., v]) for v in range(V)], -1)
    torch.testing.assert_close(
        lps.double().exp().sum(-1), torch.ones(B, T, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert torch.all(lps <= 0)
    lbl = all_labels[..., 0]
    torch.testing.assert_close(
        logprobs_from_logits(logits + shift, lbl), logprobs_from_logits(logits, lbl), atol=1e-3, rtol=1e-5
    )


# ---------------------------------------------------------------- entropy


def _ref_entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log_softmax(logits.double(), -1)).sum(-1)


def test_entropy_by_hand_and_against_reference():
    # uniform over 4 tokens: log 4 = 1.3863; one-hot-ish (one logit +inf-like): ~0
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_from_logits(torch.tensor([[1e4, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(5)
    full = (torch.randn(3, 5, 13, generator=gen) * 4).requires_grad_()
    logits = full[:, :-1]
    g = torch.randn(3, 4, generator=gen)
    ent = entropy_from_logits(logits, chunk_size=2)
    torch.testing.assert_close(ent.double(), _ref_entropy(logits), atol=1e-5, rtol=1e-5)
    (ent * g).sum().backward()
    ours = full.grad.clone()
    full.grad = None
    (_ref_entropy(logits) * g.double()).sum().backward()
    torch.testing.assert_close(ours, full.grad, atol=1e-5, rtol=1e-4)


def test_entropy_with_minus_inf_logits_and_bf16():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    ent = entropy_from_logits(logits)
    assert ent.item() == pytest.approx(math.log(2), abs=1e-6)  # two equally likely tokens
    ent.backward()
    assert torch.all(torch.isfinite(logits.grad))
    b = torch.randn(2, 3, 40).bfloat16()
    e = entropy_from_logits(b)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e.double(), _ref_entropy(b), atol=1e-5, rtol=1e-5)
    # uniform is the maximum: entropy <= log V
    assert torch.all(e <= math.log(40) + 1e-5)


def test_entropy_matches_reference_with_temperature():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 9, generator=gen)
    torch.testing.assert_close(
        entropy_from_logits(logits, temperature=2.0).double(),
        _ref_entropy(logits / 2.0),
        atol=1e-6,
        rtol=1e-6,
    )
    # a higher temperature flattens the distribution: more entropy
    assert torch.all(entropy_from_logits(logits, temperature=2.0) > entropy_from_logits(logits))
