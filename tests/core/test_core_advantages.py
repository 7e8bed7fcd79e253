"""Tests for lightning_rlhf.core.advantages: GAE, whitening, group advantages, KL, controllers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rlhf.core import (
    AdaptiveKLController,
    FixedKLController,
    flat_groups,
    gae,
    group_advantages,
    group_centred,
    kl_penalty,
    masked_moments,
    moments_mean_var,
    whiten,
)

FAST = settings(max_examples=25, deadline=None)


def _right_padded(B, T, gen, include_edge_rows=True):
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    if include_edge_rows:
        lengths[0] = 0  # all-masked row
        if B > 1:
            lengths[1] = 1  # length-1 response
    return torch.arange(T)[None, :] < lengths[:, None], lengths


# ---------------------------------------------------------------- GAE


def _gae_loop(rewards, values, lengths, gamma, lam):
    """cleanrl-style GAE over each row's real tokens, in plain Python floats."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = int(lengths[i])
        lastgaelam = 0.0
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0  # terminal after last token
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[i][t] = lastgaelam
            ret[i][t] = lastgaelam + float(values[i, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 9
    mask, lengths = _right_padded(B, T, gen)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_by_hand():
    # one row, 3 real tokens + 1 pad; score 1 on the last real token; V = 0.5 everywhere.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # gamma = 1, lam = 0.5:
    # delta_2 = 1 + 0 - 0.5 = 0.5 (value after the last real token is 0)
    # delta_1 = 0 + 0.5 - 0.5 = 0, delta_0 = 0
    # A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0 + 0.5 * 0.25 = 0.125
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist() == [[0.125, 0.25, 0.5, 0.0]]
    assert ret.tolist() == [[0.625, 0.75, 1.0, 0.0]]  # A + V on real tokens, 0 on the pad
    # lam = 1: Monte-Carlo return - V = 1 - 0.5 everywhere
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5, 0.0]]
    assert ret.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_gae_outputs_are_constants():
    rewards = torch.randn(2, 4, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    adv, ret = gae(rewards, values, torch.ones(2, 4))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError):
        gae(rewards, values, torch.ones(2, 3))


@FAST
@given(st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**31 - 1), st.floats(-1e3, 1e3))
def test_gae_ignores_padding(B, T, seed, pad):
    gen = torch.Generator().manual_seed(seed)
    mask, _ = _right_padded(B, T, gen, include_edge_rows=False)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    a1, r1 = gae(rewards, values, mask)
    a2, r2 = gae(rewards.masked_fill(~mask, pad), values.masked_fill(~mask, -pad), mask)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    assert torch.all(a1[~mask] == 0) and torch.all(r1[~mask] == 0)


# ---------------------------------------------------------------- whiten


def test_whiten_by_hand_and_shift_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var ((1)^2 + 0 + (1)^2) / 2 = 1 -> [-1, 0, 1]
    torch.testing.assert_close(whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False keeps the mean (TRL): [-1, 0, 1] + 2
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    )
    # biased var 2/3 -> scale sqrt(3/2)
    s = math.sqrt(1.5)
    torch.testing.assert_close(whiten(x, mask, eps=0.0, unbiased=False), torch.tensor([[-s, 0.0, s, 0.0]]))


def test_whiten_matches_trl_formula_written_out():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64) * 3 + 2
    mask, _ = _right_padded(5, 8, gen)
    vals = x[mask]
    ref = (x - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(whiten(x, mask)[mask], ref[mask])


@FAST
@given(
    st.integers(1, 4),
    st.integers(2, 8),
    st.integers(0, 2**31 - 1),
    st.floats(0.01, 1e3),
    st.floats(-1e3, 1e3),
)
def test_whiten_gives_masked_mean_0_var_1(B, T, seed, scale, loc):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=gen, dtype=torch.float64) * scale + loc
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[0, :2] = True  # at least two real elements
    w = whiten(x, mask, eps=0.0)
    vals = w[mask]
    assert abs(vals.mean().item()) < 1e-9
    assert vals.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-9) or vals.std().item() == 0
    assert torch.all(w[~mask] == 0)
    # perturbing the padding changes nothing
    assert torch.equal(w, whiten(x.masked_fill(~mask, 1e30), mask, eps=0.0))


def test_moments_give_the_mean_and_variance_of_the_real_elements():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen) * 4 + 100  # a large mean: the float64 sums keep the digits
    mask, _ = _right_padded(6, 5, gen)
    vals = x[mask].double()
    m = masked_moments(x.masked_fill(~mask, float("nan")), mask)  # padding never counts, even NaN
    assert m.dtype == torch.float64 and m[0].item() == mask.sum().item()
    mean, var = moments_mean_var(m)
    torch.testing.assert_close(mean, vals.mean(), atol=1e-10, rtol=0)
    torch.testing.assert_close(var, vals.var(unbiased=True), atol=0, rtol=1e-9)
    torch.testing.assert_close(moments_mean_var(m, unbiased=False)[1], vals.var(unbiased=False), atol=0, rtol=1e-9)
    # as masked_var: no element / one element -> mean 0 / variance 0, not NaN
    for n in (0, 1):
        one = torch.zeros(4, dtype=torch.bool)
        one[:n] = True
        mean, var = moments_mean_var(masked_moments(torch.full((4,), 7.0), one))
        assert mean.item() == (7.0 if n else 0.0) and var.item() == 0.0


@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_whiten_with_summed_moments_equals_whitening_the_union(b0, b1, T, seed, unbiased):
    """Two "ranks" whitening their rows with the sum of their moments give what one process gets by
    whitening all rows at once (what PPO's global advantage whitening relies on); each rank's own
    statistics would not."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b0 + b1, T, generator=gen, dtype=torch.float64) * 3 + 1
    mask = torch.rand(b0 + b1, T, generator=gen) < 0.7
    mask[0, :2] = True
    mask[b0, 0] = True  # each part has a real element
    parts = [(x[:b0], mask[:b0]), (x[b0:], mask[b0:])]
    total = sum(masked_moments(xi, mi) for xi, mi in parts)  # the all-reduce
    got = torch.cat([whiten(xi, mi, moments=total, unbiased=unbiased) for xi, mi in parts])
    torch.testing.assert_close(got, whiten(x, mask, unbiased=unbiased), atol=1e-9, rtol=1e-9)
    # an independent formula: (x - mean) / sqrt(var + eps) over the union's real values
    vals = x[mask]
    ref = (x - vals.mean()) / torch.sqrt(vals.var(unbiased=unbiased) + 1e-8)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-9, rtol=1e-9)
    assert torch.all(got[~mask] == 0)
    # float32 input: float64 moments, a float32 result
    x32 = x.float()
    got32 = whiten(x32, mask, moments=masked_moments(x32, mask))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, whiten(x32, mask), atol=1e-5, rtol=1e-5)


def test_per_part_whitening_differs_from_the_union():
    x = torch.tensor([[1.0, 2.0], [10.0, 30.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    per_part = torch.cat([whiten(x[:1], mask[:1]), whiten(x[1:], mask[1:])])
    assert not torch.allclose(per_part, whiten(x, mask))  # why the moments are all-reduced


# ---------------------------------------------------------------- group advantages


def _group_ref(rewards, k, method, scale_by_std, eps):
    out = []
    r = [float(v) for v in rewards]
    for g0 in range(0, len(r), k):
        grp = r[g0 : g0 + k]
        mean = sum(grp) / k
        if method == "grpo":
            std = math.sqrt(sum((v - mean) ** 2 for v in grp) / (k - 1)) if k > 1 else 0.0
            out += [(v - mean) / (std + eps) if scale_by_std else v - mean for v in grp]
        elif method == "rloo":
            out += [v - (sum(grp) - v) / (k - 1) for v in grp]
        else:
            out += [v - mean for v in grp]
    if method == "reinforce_pp":
        m = sum(out) / len(out)
        std = math.sqrt(sum((v - m) ** 2 for v in out) / len(out))
        out = [(v - m) / (std + eps) for v in out]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "method,scale", [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp", True)]
)
def test_group_advantages_match_reference(method, scale):
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(r, 4, method=method, scale_by_std=scale), _group_ref(r, 4, method, scale, 1e-6)
    )


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])  # one group of 4, mean 3, deviations [-2, -1, 0, 3]
    torch.testing.assert_close(
        group_advantages(r, 4, "grpo", scale_by_std=False), torch.tensor([-2.0, -1.0, 0.0, 3.0])
    )
    # unbiased std = sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602
    torch.testing.assert_close(
        group_advantages(r, 4, "grpo", eps=0.0), torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(14 / 3)
    )
    # RLOO: 1 - (2+3+6)/3 = -8/3, 2 - 10/3 = -4/3, 3 - 9/3 = 0, 6 - 6/3 = 4  (= 4/3 * deviations)
    torch.testing.assert_close(group_advantages(r, 4, "rloo"), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    # REINFORCE++: groups [0, 1] and [1, 3] -> a = [-0.5, 0.5, -1, 1]; batch std (population)
    # sqrt((0.25 + 0.25 + 1 + 1) / 4) = sqrt(0.625) = 0.7906
    got = group_advantages(torch.tensor([0.0, 1.0, 1.0, 3.0]), 2, "reinforce_pp", eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / math.sqrt(0.625))


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_pp"])
def test_group_advantages_with_summed_moments_equal_the_union(method):
    """REINFORCE++ whitens over the batch: two "ranks" passing the sum of their group-centred
    rewards' moments get one process's advantages on all groups; the per-group methods ignore
    ``moments``."""
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(6 * 3, generator=gen, dtype=torch.float64) * 2
    r[6:9] = 0.5  # a flat group: still counted in the statistics, advantage 0
    parts = (r[:9], r[9:])  # 3 groups of 3 on each rank
    total = sum(masked_moments(group_centred(p, 3), torch.ones_like(p, dtype=torch.bool)) for p in parts)
    got = torch.cat([group_advantages(p, 3, method, moments=total) for p in parts])
    torch.testing.assert_close(got, group_advantages(r, 3, method), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, _group_ref(r, 3, method, True, 1e-6), atol=1e-10, rtol=1e-10)
    assert torch.equal(got[6:9], torch.zeros(3, dtype=torch.float64))
    if method == "reinforce_pp":
        alone = torch.cat([group_advantages(p, 3, method) for p in parts])
        assert not torch.allclose(alone, got)  # each rank's own statistics are not the batch's
    torch.testing.assert_close(
        group_centred(r, 3), (r.view(-1, 3) - r.view(-1, 3).mean(1, keepdim=True)).flatten()
    )


def test_group_advantages_options_and_errors():
    r = torch.tensor([0.0, 1.0, 5.0, 5.5])
    assert not torch.allclose(
        group_advantages(r, 2, scale_by_std=True), group_advantages(r, 2, scale_by_std=False)
    )
    # identical rewards in a group: no signal, and no NaN
    assert torch.equal(group_advantages(torch.ones(4), 2), torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([3.0, 4.0]), 1), torch.zeros(2))  # groups of one
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32  # int rewards
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 1, "rloo")
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, "ppo")
    assert not group_advantages(torch.randn(4, requires_grad=True), 2).requires_grad


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_pp"])
def test_group_advantages_are_exactly_zero_for_flat_groups(method):
    # a group of eight 0.3s: in float32 their mean is 0.3 - 3e-8, so r - mean is a rounding error
    # that grpo's / (std + eps) and reinforce_pp's batch whitening would turn into a signal
    flat = torch.full((8,), 0.3)
    assert flat.mean() != flat[0]
    signal = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.5, 0.0, 0.0, 0.0])
    r = torch.cat([signal, flat, torch.full((8,), -2.0)])  # 3 groups of 8
    adv = group_advantages(r, 8, method)
    assert torch.equal(adv[8:], torch.zeros(16))
    # the group with signal is computed as without the rule
    torch.testing.assert_close(adv[:8], group_advantages(r, 8, method, flat_atol=-1.0)[:8], atol=0, rtol=0)
    torch.testing.assert_close(adv[:8], _group_ref(r, 8, method, True, 1e-6)[:8].float(), atol=1e-5, rtol=1e-5)
    assert flat_groups(r, 8).tolist() == [False, True, True]
    assert flat_groups(torch.tensor([1.0, 1.0 + 1e-7, 1.0, 1.5]), 2).tolist() == [True, False]  # atol 1e-6
    assert flat_groups(torch.tensor([1.0, 1.0 + 1e-7]), 2, atol=0.0).tolist() == [False]


@FAST
@given(
    st.integers(1, 4),
    st.integers(2, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["grpo", "rloo", "reinforce_pp"]),
)
def test_group_advantages_sum_to_zero(n_groups, k, seed, method):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * k, generator=gen, dtype=torch.float64) * 10
    adv = group_advantages(r, k, method=method)
    if method == "reinforce_pp":
        assert abs(adv.sum().item()) < 1e-8  # zero over the batch (and per group, by construction)
    torch.testing.assert_close(
        adv.view(n_groups, k).sum(1), torch.zeros(n_groups, dtype=torch.float64), atol=1e-8, rtol=0
    )
    # a constant added to every reward of a group changes nothing
    shifted = r + torch.arange(n_groups, dtype=torch.float64).repeat_interleave(k) * 3.0
    torch.testing.assert_close(group_advantages(shifted, k, method=method), adv, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------- KL estimators


def test_kl_penalty_by_hand():
    # pi = 0.5, pi_ref = 0.25 on the sampled token: x = log(pi / pi_ref) = log 2 = 0.6931
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    x = math.log(2)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(x, abs=1e-6)  # 0.6931
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * x * x, abs=1e-6)  # 0.2402
    # k3: r = pi_ref / pi = 0.5; (r - 1) - log r = -0.5 + 0.6931 = 0.1931
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + x, abs=1e-6)
    assert kl_penalty(ref, lp, "abs").item() == pytest.approx(x, abs=1e-6)  # |-0.6931|
    assert kl_penalty(ref, lp, "k1").item() == pytest.approx(-x, abs=1e-6)  # k1 can be negative


def test_kl_estimators_are_unbiased_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q) = 0.2308
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, ref = p.log()[idx], q.log()[idx]
    for kind in ("k1", "k3"):
        assert kl_penalty(lp, ref, kind).mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_penalty(lp, ref, "k2").mean().item() != pytest.approx(true_kl, abs=5e-3)  # biased


def test_kl_penalty_large_logprobs_gradients_and_mask():
    lp = torch.tensor([[-1e4 + 0.5, -1e4, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1e4, -1e4 + 0.5, float("nan")]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    naive_ratio = torch.exp(ref) / torch.exp(lp)  # 0 / 0
    assert torch.isnan(naive_ratio[0, :2]).all()
    k3 = kl_penalty(lp, ref, "k3", mask=mask)
    expected = [math.expm1(-0.5) + 0.5, math.expm1(0.5) - 0.5, 0.0]
    torch.testing.assert_close(k3, torch.tensor([expected], dtype=torch.float64))
    k3.sum().backward()
    assert ref.grad is None  # the reference is a constant
    assert lp.grad[0, 2].item() == 0.0  # padding gets no gradient
    # d k3 / dx = 1 - exp(-x)
    torch.testing.assert_close(
        lp.grad[0, :2], torch.tensor([1 - math.exp(-0.5), 1 - math.exp(0.5)], dtype=torch.float64)
    )
    # clamp bounds x before the estimator
    big = kl_penalty(torch.tensor([0.0]), torch.tensor([100.0]), "k3", clamp=10.0)
    assert big.item() == pytest.approx(math.expm1(10) - 10)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


@FAST
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20))
def test_k2_k3_abs_are_non_negative(xs):
    lp = torch.tensor(xs, dtype=torch.float64)
    ref = torch.zeros_like(lp)
    for kind in ("k2", "k3", "abs"):
        assert torch.all(kl_penalty(lp, ref, kind) >= 0)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand_and_state():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # error = clip(9 / 6 - 1 = 0.5, -0.2, 0.2) = 0.2; value = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.201024)
    # error = clip(3 / 6 - 1 = -0.5) = -0.2; value *= 1 - 0.00512
    ctl.update(torch.tensor(3.0), 256)
    assert ctl.value == pytest.approx(0.201024 * (1 - 0.00512))
    # inside the band the error is proportional: 6.6 / 6 - 1 = 0.1
    before = ctl.value
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 1000 / 10_000))
    other = AdaptiveKLController(0.05, 6.0, 10_000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)


def test_fixed_kl_controller_has_same_interface():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 10) == 0.05 and ctl.value == 0.05
    ctl.load_state_dict({"value": 0.1})
    assert ctl.state_dict() == {"value": 0.1}


def test_token_rewards_by_hand_and_against_a_loop():
    from lightning_rlhf.core import token_rewards

    # Two responses of length 3 and 1 in T=4; a third with no real token.
    scores = torch.tensor([1.0, -2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    got = token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.5*kl on each real token, +1 on the third; row 1: -0.25 - 2 on its only token;
    # row 2: nothing (its score has no token to sit on); padding always 0 (the 9.0s never leak).
    want = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(got, want)
    # random inputs against a Python loop
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    scores, kl = torch.randn(B, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ref = torch.zeros(B, T)
    for b in range(B):
        for t in range(int(lengths[b])):
            ref[b, t] = -0.3 * kl[b, t] + (scores[b] if t == int(lengths[b]) - 1 else 0.0)
    torch.testing.assert_close(token_rewards(scores, kl, mask, 0.3), ref)
