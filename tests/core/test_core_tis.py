"""Truncated importance sampling of engine-vs-trainer log-prob mismatch, checked by hand."""

import math

import pytest
import torch

from lightning_rlhf.core import ppo_policy_loss, truncated_importance_weights


def test_tis_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, 9.0]])
    engine = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token is padding (garbage log-probs)
    w, stats = truncated_importance_weights(trainer, engine, mask, cap=1.5)
    raw = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(-2.0), math.exp(0.1)]  # pi_old / q per real token
    expected = [min(r, 1.5) for r in raw]  # exp(0.5) = 1.65 is truncated
    assert torch.allclose(w[mask.bool()], torch.tensor(expected), atol=1e-6)
    assert w[1, 2] == 0.0 and not w.requires_grad
    assert stats["tis_weight_mean"].item() == pytest.approx(sum(expected) / 5, abs=1e-6)
    assert stats["tis_clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["logprob_diff_mean"].item() == pytest.approx((0.5 + 1.0 + 0.0 + 2.0 + 0.1) / 5, abs=1e-6)
    assert stats["logprob_diff_max"].item() == pytest.approx(2.0)


def test_tis_weights_scale_each_tokens_policy_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(2, 4, requires_grad=True)
    old = logprobs.detach() + 0.05 * torch.randn(2, 4)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    weights = torch.rand(2, 4) * 2
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, token_weights=weights, agg="token_mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    plain, _ = ppo_policy_loss(logprobs, old, adv, mask, agg="token_mean")
    (grad_plain,) = torch.autograd.grad(plain, logprobs)
    assert torch.allclose(grad, grad_plain * weights * mask)  # the weight multiplies each token's term
    ones, _ = ppo_policy_loss(logprobs, old, adv, mask, token_weights=torch.ones(2, 4))
    assert torch.allclose(ones, ppo_policy_loss(logprobs, old, adv, mask)[0])


def test_tis_refuses_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match="must match"):
        truncated_importance_weights(x, torch.zeros(2, 4), x, cap=2.0)
