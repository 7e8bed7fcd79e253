"""Tests for lightning_rlhf.core.losses against formulas written out, loops and hand arithmetic."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rlhf.core import (
    aggregate_loss,
    dpo_loss,
    orpo_loss,
    ppo_policy_loss,
    reward_loss,
    sft_loss,
    value_loss,
)

FAST = settings(max_examples=25, deadline=None)


def _log_sigmoid(z: float) -> float:
    """log(1 / (1 + e^-z)), written out (stable for both signs)."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _right_padded(B, T, gen):
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = 0  # all-masked row
    if B > 1:
        lengths[1] = 1  # length-1 response
    return torch.arange(T)[None, :] < lengths[:, None]


# ---------------------------------------------------------------- SFT


def _sft_ref(logits, labels, mask, reduction):
    """Token loop with F.cross_entropy per target in float64."""
    B, T, _ = logits.shape
    per = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                per[b, t] = F.cross_entropy(logits[b, t - 1].double()[None], labels[b, t][None])
    n = mask[:, 1:].sum()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "token_mean":
        return per.sum() / n if n else per.sum() * 0
    rows = [per[b].sum() / mask[b, 1:].sum() for b in range(B) if mask[b, 1:].any()]
    return torch.stack(rows).mean() if rows else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["token_mean", "sum", "seq_mean", "none"])
def test_sft_loss_matches_token_loop(reduction):
    gen = torch.Generator().manual_seed(0)
    B, T, V = 4, 6, 10
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = _right_padded(B, T, gen)
    mask[2, 0] = True  # column 0 is never a target
    out = sft_loss(logits, labels, mask, reduction=reduction)
    torch.testing.assert_close(out.double(), _sft_ref(logits, labels, mask, reduction), atol=1e-5, rtol=1e-5)


def test_sft_loss_by_hand_and_gradients():
    # V = 2, logits [0, 0] -> p = 0.5 each -> NLL log 2 = 0.6931 for any target;
    # logits [log 3, 0] -> p(token 0) = 0.75 -> NLL -log 0.75 = 0.2877.
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])
    # targets: labels[1] = 0 from logits[0] (0.2877), labels[2] = 1 from logits[1] (0.6931)
    loss = sft_loss(logits, labels, mask)
    assert loss.item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2, abs=1e-6)
    loss.backward()
    assert torch.all(logits.grad[0, 2] == 0)  # the last position predicts nothing
    assert sft_loss(logits, labels, torch.zeros_like(mask)).item() == 0.0  # no target: 0, not NaN
    assert sft_loss(logits, labels, mask, "none").shape == (1, 3)
    # reductions differ when rows have different lengths
    mask2 = torch.tensor([[0, 1, 1], [0, 1, 0]])
    lg, lb = torch.randn(2, 3, 2), torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert sft_loss(lg, lb, mask2, "token_mean") != sft_loss(lg, lb, mask2, "seq_mean")


def test_sft_loss_bf16_and_padding_gets_no_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 7, (3, 5), generator=gen)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    loss = sft_loss(logits, labels, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss.double(), _sft_ref(logits, labels, mask, "token_mean"), atol=1e-5, rtol=1e-5
    )
    loss.backward()
    # logits[:, t-1] is used only if mask[:, t]; row 2 and positions 2..4 of row 0 get nothing
    assert torch.all(logits.grad[2] == 0) and torch.all(logits.grad[0, 2:] == 0)
    with pytest.raises(ValueError):
        sft_loss(logits, labels, mask, reduction="mean")


# ---------------------------------------------------------------- reward model


def test_reward_loss_by_hand_and_against_formula():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = 0.3133, -log sigmoid(-2) = 2.1269 -> mean 1.2201
    expected = -(_log_sigmoid(1.0) + _log_sigmoid(-2.0)) / 2
    assert reward_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)
    # margin 0.5 on both: -logsigmoid(0.5), -logsigmoid(-2.5)
    expected_m = -(_log_sigmoid(0.5) + _log_sigmoid(-2.5)) / 2
    assert reward_loss(rc, rr, margin=torch.tensor([0.5, 0.5])).item() == pytest.approx(expected_m, abs=1e-6)
    assert reward_loss(rc, rr, margin=0.5).item() == pytest.approx(expected_m, abs=1e-6)
    # centering: + 0.01 * mean((1 + 0)^2, (0 + 2)^2) = 0.01 * 2.5
    assert reward_loss(rc, rr, center_coef=0.01).item() == pytest.approx(expected + 0.025, abs=1e-6)


def test_reward_loss_large_gap_is_finite_and_gradient_is_antisymmetric():
    rc = torch.tensor([-500.0, 500.0], requires_grad=True)
    rr = torch.tensor([500.0, -500.0], requires_grad=True)
    naive = -torch.log(torch.sigmoid(rc - rr))
    assert torch.isinf(naive[0])
    loss = reward_loss(rc, rr)
    assert loss.item() == pytest.approx(1000.0 / 2, rel=1e-6)  # (1000 + 0) / 2
    loss.backward()
    torch.testing.assert_close(rc.grad, -rr.grad)


# ---------------------------------------------------------------- DPO family


def _dpo_ref(pc, pr, rc, rr, beta, loss_type, eps, gamma):
    out = []
    for i in range(len(pc)):
        if loss_type == "simpo":
            z = beta * (pc[i] - pr[i]) - gamma
            out.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
            continue
        h = (pc[i] - pr[i]) - (rc[i] - rr[i])
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        elif loss_type == "robust":
            out.append((-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "loss_type,eps",
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("simpo", 0.1)],
)
@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: sequence log-probs of long responses
def test_dpo_losses_match_formulas(loss_type, eps, scale):
    gen = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-(torch.rand(8, generator=gen, dtype=torch.float64) * scale) for _ in range(4))
    beta = 2.0 if loss_type == "simpo" else 0.1
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref = _dpo_ref(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, eps, 0.5)
    torch.testing.assert_close(losses, ref)
    assert torch.isfinite(losses).all()
    if loss_type == "simpo":
        torch.testing.assert_close(cr, beta * pc)
    else:
        torch.testing.assert_close(cr, beta * (pc - rc))
        torch.testing.assert_close(rj, beta * (pr - rr))


def test_dpo_losses_by_hand():
    t = torch.tensor
    pc, pr, rc, rr = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])
    # h = (-1 + 3) - 0 = 2, beta h = 0.2; -logsigmoid(0.2) = log(1 + e^-0.2) = 0.5981
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(0.598139, abs=1e-5)
    # rewards: 0.1 * (-1 + 2) = 0.1 and 0.1 * (-3 + 2) = -0.1
    assert cr.item() == pytest.approx(0.1) and rj.item() == pytest.approx(-0.1)
    # IPO: (2 - 1 / 0.2)^2 = 9
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(9.0)
    # hinge: relu(1 - 0.2) = 0.8
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    # robust, eps 0.1: (0.9 * 0.5981 - 0.1 * 0.7981) / 0.8 = 0.5731
    rob = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="robust", label_smoothing=0.1)[0]
    assert rob.item() == pytest.approx((0.9 * 0.598139 - 0.1 * 0.798139) / 0.8, abs=1e-5)
    # SimPO, beta 2, gamma 0.5, no reference: 2 * 2 - 0.5 = 3.5 -> log(1 + e^-3.5) = 0.02975
    simpo = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", gamma=0.5)[0]
    assert simpo.item() == pytest.approx(math.log1p(math.exp(-3.5)), abs=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al. 2024, Lemma 3.1: E over flips at rate eps of the robust loss = clean DPO loss."""
    h = torch.linspace(-20, 20, 41, dtype=torch.float64)
    zero = torch.zeros_like(h)
    eps, beta = 0.3, 0.5
    fwd = dpo_loss(h, zero, zero, zero, beta=beta, loss_type="robust", label_smoothing=eps)[0]
    flipped = dpo_loss(zero, h, zero, zero, beta=beta, loss_type="robust", label_smoothing=eps)[0]
    clean = dpo_loss(h, zero, zero, zero, beta=beta)[0]
    torch.testing.assert_close((1 - eps) * fwd + eps * flipped, clean)


def test_dpo_gradients_and_errors():
    pc = torch.tensor([-5.0, -2.0], requires_grad=True)
    pr = torch.tensor([-4.0, -6.0], requires_grad=True)
    rc = torch.tensor([-5.0, -3.0], requires_grad=True)
    rr = torch.tensor([-4.0, -5.0], requires_grad=True)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr)
    assert not cr.requires_grad and not rj.requires_grad
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None  # reference is a constant
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # raise chosen, lower rejected
    # label smoothing changes the sigmoid loss
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr)[0], dpo_loss(pc, pr, rc, rr, label_smoothing=0.1)[0])
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, None, None)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")


def _orpo_ref(lc, lr, beta):
    out = []
    for c, r in zip(lc, lr, strict=True):
        log_odds_c = c - math.log(-math.expm1(c))
        log_odds_r = r - math.log(-math.expm1(r))
        out.append(-beta * _log_sigmoid(log_odds_c - log_odds_r))
    return torch.tensor(out, dtype=torch.float64)


def test_orpo_loss_by_hand_and_against_formula():
    # chosen p = 0.5 -> odds 1, log odds 0; rejected p = 0.2 -> odds 0.25, log odds -1.3863
    # sigmoid(1.3863) = 0.8 -> loss = -beta * log 0.8 = beta * 0.2231
    losses, cr, rj = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.1)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.8), abs=1e-6)
    assert cr.item() == pytest.approx(0.1 * math.log(0.5))
    gen = torch.Generator().manual_seed(3)
    lc = -torch.rand(6, generator=gen, dtype=torch.float64) * 5
    lr = -torch.rand(6, generator=gen, dtype=torch.float64) * 5
    lc[0], lr[0] = -1e-9, -40.0  # near-certain chosen, near-impossible rejected
    torch.testing.assert_close(orpo_loss(lc, lr, 0.2)[0], _orpo_ref(lc.tolist(), lr.tolist(), 0.2))
    # log-probs at exactly 0 (p = 1) stay finite
    assert torch.isfinite(orpo_loss(torch.zeros(1), torch.tensor([-1.0]), 0.1)[0]).all()
    lcg = lc.clone().requires_grad_()
    orpo_loss(lcg, lr, 0.2)[0].sum().backward()
    assert torch.all(lcg.grad <= 0)  # raising the chosen log-prob lowers the loss


# ---------------------------------------------------------------- PPO


def _ppo_ref(logprobs, old, adv, mask, clip_lo, clip_hi, dual, agg, max_len):
    """Per-token loop in Python floats."""
    B, T = logprobs.shape
    per = [[0.0] * T for _ in range(B)]
    clipped = []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv[b, t]) if adv.dim() == 2 else float(adv[b])
            ratio = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            unclipped = -a * ratio
            clip = -a * min(max(ratio, 1 - clip_lo), 1 + clip_hi)
            loss = max(unclipped, clip)
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            per[b][t] = loss
            clipped.append(clip > unclipped)
    n = int(mask.sum())
    if agg == "token_mean":
        loss = sum(map(sum, per)) / n if n else 0.0
    elif agg == "seq_mean_token_mean":
        rows = [sum(per[b]) / int(mask[b].sum()) for b in range(B) if mask[b].any()]
        loss = sum(rows) / len(rows) if rows else 0.0
    else:
        loss = sum(map(sum, per)) / (B * (max_len or T))
    return loss, (sum(clipped) / n if n else 0.0)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("clip_hi,dual", [(None, None), (0.28, None), (None, 3.0)])
@pytest.mark.parametrize("per_seq_adv", [False, True])
def test_ppo_policy_loss_matches_token_loop(agg, clip_hi, dual, per_seq_adv):
    gen = torch.Generator().manual_seed(4)
    B, T = 5, 7
    mask = _right_padded(B, T, gen)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logprobs = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.8  # many clipped tokens
    adv = (
        torch.randn(B, generator=gen, dtype=torch.float64)
        if per_seq_adv
        else torch.randn(B, T, generator=gen, dtype=torch.float64)
    )
    max_len = 10 if agg == "seq_mean_token_sum" else None
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, 0.2, clip_hi, dual, agg, max_len)
    ref_loss, ref_clipfrac = _ppo_ref(logprobs, old, adv, mask, 0.2, clip_hi or 0.2, dual, agg, max_len)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(ref_clipfrac, abs=1e-10)
    ratio = (logprobs - old).exp()[mask]
    assert stats["approx_kl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), abs=1e-10)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item(), abs=1e-10)
    if per_seq_adv:
        expanded = ppo_policy_loss(
            logprobs, old, adv[:, None].expand(B, T), mask, 0.2, clip_hi, dual, agg, max_len
        )[0]
        assert loss.item() == pytest.approx(expanded.item(), abs=1e-12)


def test_ppo_policy_loss_by_hand():
    t = torch.tensor
    one = t([[1]])
    # ratio 1 -> nothing clipped: loss = -A = -2
    loss, stats = ppo_policy_loss(t([[-1.0]]), t([[-1.0]]), t([[2.0]]), one)
    assert loss.item() == -2.0 and stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    lr = math.log(1.5)
    # ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped at 1 + 0.2)
    loss, stats = ppo_policy_loss(t([[lr]]), t([[0.0]]), t([[1.0]]), one)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    # ratio 0.5, A = 1: max(-0.5, -0.8) = -0.5 (the pessimistic, unclipped term)
    assert ppo_policy_loss(t([[math.log(0.5)]]), t([[0.0]]), t([[1.0]]), one)[0].item() == pytest.approx(-0.5)
    # ratio 0.5, A = -1: max(0.5, 0.8) = 0.8
    assert ppo_policy_loss(t([[math.log(0.5)]]), t([[0.0]]), t([[-1.0]]), one)[0].item() == pytest.approx(0.8)
    # ratio 1.25, A = 1: symmetric clip -> -1.2; clip-higher 0.28 -> -1.25 (not clipped)
    l25 = math.log(1.25)
    assert ppo_policy_loss(t([[l25]]), t([[0.0]]), t([[1.0]]), one)[0].item() == pytest.approx(-1.2)
    higher = ppo_policy_loss(t([[l25]]), t([[0.0]]), t([[1.0]]), one, clip_eps_high=0.28)[0]
    assert higher.item() == pytest.approx(-1.25)
    # ratio 4, A = -1: max(4, 1.2) = 4; dual-clip 3 caps it at 3
    l4 = math.log(4.0)
    assert ppo_policy_loss(t([[l4]]), t([[0.0]]), t([[-1.0]]), one)[0].item() == pytest.approx(4.0)
    dual = ppo_policy_loss(t([[l4]]), t([[0.0]]), t([[-1.0]]), one, dual_clip=3.0)[0]
    assert dual.item() == pytest.approx(3.0)


def test_ppo_aggregation_modes_by_hand():
    # ratio 1 everywhere, so the per-token loss is -A: [[1, 2, pad], [3, pad, pad]]
    adv = -torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lp = torch.zeros(2, 3)

    def agg(mode, **kw):
        return ppo_policy_loss(lp, lp, adv, mask, agg=mode, **kw)[0].item()

    assert agg("token_mean") == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert agg("seq_mean_token_mean") == pytest.approx(2.25)  # (1.5 + 3) / 2
    assert agg("seq_mean_token_sum") == pytest.approx(1.0)  # (3 + 3) / (2 rows * T=3)
    assert agg("seq_mean_token_sum", max_len=4) == pytest.approx(0.75)  # 6 / (2 * 4)
    with pytest.raises(ValueError):
        agg("mean")


def test_aggregate_loss_by_hand():
    # real tokens [[1, 2, (pad 50)], [3, (pad 50), (pad 50)], [(pad 50) x 3]]: the last row is empty
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0], [50.0, 50.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregate_loss(x, mask, "token_mean").item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    # per row 1.5 and 3; the empty row does not count: (1.5 + 3) / 2
    assert aggregate_loss(x, mask.bool(), "seq_mean_token_mean").item() == pytest.approx(2.25)
    assert aggregate_loss(x, mask, "seq_mean_token_sum").item() == pytest.approx(1.0 / 1.5)  # 6 / (3 * T=3)
    loss = aggregate_loss(x, mask, "seq_mean_token_sum", max_len=4)  # 6 / (3 rows * 4)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(x.grad, mask / 12.0)  # 1 / (B * max_len) on real tokens, 0 on padding
    empty = torch.zeros(2, 3)
    assert aggregate_loss(empty, empty, "token_mean").item() == 0.0
    assert aggregate_loss(empty, empty, "seq_mean_token_mean").item() == 0.0
    with pytest.raises(ValueError, match="agg"):
        aggregate_loss(x, mask, "mean")


def test_ppo_gradients_flow_only_where_they_should():
    gen = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    logprobs = torch.randn(3, 4, generator=gen).requires_grad_()
    old = (logprobs.detach() + 0.1).masked_fill(~mask, float("nan")).requires_grad_()
    adv = torch.randn(3, 4, generator=gen).masked_fill(~mask, float("inf")).requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert torch.all(logprobs.grad[~mask] == 0)
    assert torch.all(logprobs.grad[mask] != 0)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # all-masked batch: loss 0, not NaN
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        assert (
            ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), empty, agg=mode)[0].item()
            == 0.0
        )


def test_ppo_large_magnitude_logprobs():
    # log-probs around -1e4: exp(lp) / exp(old) is 0/0; the log-ratio form is exact
    lp = torch.tensor([[-1e4 + 0.1, -1e4]], dtype=torch.float64)
    old = torch.tensor([[-1e4, -1e4 + 0.1]], dtype=torch.float64)
    assert torch.isnan(torch.exp(lp) / torch.exp(old)).all()
    loss, stats = ppo_policy_loss(lp, old, torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2))
    # ratios e^0.1 = 1.105, e^-0.1 = 0.905 (both inside the clip range): loss = -(1.105 + 0.905) / 2
    assert loss.item() == pytest.approx(-(math.exp(0.1) + math.exp(-0.1)) / 2)
    assert stats["clipfrac"].item() == 0.0


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.floats(-1e3, 1e3),
    st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]),
)
def test_ppo_and_value_losses_ignore_padding(B, T, seed, pad, agg):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) < 0.6
    lp, old, adv, v, ov, ret = (torch.randn(B, T, generator=gen, dtype=torch.float64) for _ in range(6))

    def perturb(x):
        return x.masked_fill(~mask, pad)

    a = ppo_policy_loss(lp, old, adv, mask, agg=agg)
    b = ppo_policy_loss(perturb(lp), perturb(old), perturb(adv), mask, agg=agg)
    assert a[0].item() == b[0].item()
    assert all(a[1][k].item() == b[1][k].item() for k in ("clipfrac", "approx_kl", "ratio_mean"))
    c = value_loss(v, ov, ret, mask, agg=agg)
    d = value_loss(perturb(v), perturb(ov), perturb(ret), mask, agg=agg)
    assert c[0].item() == d[0].item() and c[1]["clipfrac"].item() == d[1]["clipfrac"].item()


# ---------------------------------------------------------------- value loss


def _value_ref(values, old, returns, mask, clip_eps):
    total, n, clipped = 0.0, 0, 0
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            err = (v - r) ** 2
            if clip_eps is None:
                total += 0.5 * err
            else:
                vc = o + min(max(v - o, -clip_eps), clip_eps)
                total += 0.5 * max(err, (vc - r) ** 2)
                clipped += (vc - r) ** 2 > err
            n += 1
    return (total / n if n else 0.0), (clipped / n if n else 0.0)


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_matches_token_loop(clip_eps):
    gen = torch.Generator().manual_seed(6)
    mask = _right_padded(4, 6, gen)
    values, old, returns = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    loss, stats = value_loss(values, old, returns, mask, clip_eps=clip_eps)
    ref_loss, ref_clipfrac = _value_ref(values, old, returns, mask, clip_eps)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(ref_clipfrac, abs=1e-12)


def test_value_loss_by_hand_and_gradients():
    t = torch.tensor
    # v = 1.5, old = 1.0, R = 2.0, eps 0.2: v_clip = 1.2; errors 0.25 vs 0.64 -> 0.5 * 0.64 = 0.32
    loss, stats = value_loss(t([[1.5]]), t([[1.0]]), t([[2.0]]), t([[1]]))
    assert loss.item() == pytest.approx(0.32) and stats["clipfrac"].item() == 1.0
    # no clipping: 0.5 * 0.25 = 0.125
    unclipped = value_loss(t([[1.5]]), t([[1.0]]), t([[2.0]]), t([[1]]), clip_eps=None)[0]
    assert unclipped.item() == pytest.approx(0.125)
    values = t([[1.5, 0.3, 9.0]], requires_grad=True)
    old = t([[1.4, 0.0, 0.0]], requires_grad=True)
    returns = t([[2.0, 0.0, 0.0]], requires_grad=True)
    loss, _ = value_loss(values, old, returns, t([[1, 1, 0]]))
    loss.backward()
    assert old.grad is None and returns.grad is None
    # token 0: v - old = 0.1 inside the clip range -> d/dv 0.5 (v - R)^2 / 2 tokens = (1.5 - 2) / 2 = -0.25
    # token 1: v_clip = 0.2, (0.2)^2 < (0.3)^2 so unclipped: (0.3 - 0) / 2 = 0.15; token 2 is padding
    torch.testing.assert_close(values.grad, t([[-0.25, 0.15, 0.0]]))
