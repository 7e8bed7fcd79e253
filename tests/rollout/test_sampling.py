"""``rollout.sample_categorical``: the sampler's draw (inverse CDF, one uniform number per row), checked
against a plain fp64 cumulative sum of the same uniform numbers, and by its frequencies."""

import numpy as np
import pytest
import torch

from lightning_rlhf.rollout import sample_categorical
from lightning_rlhf.rollout.generate import SAMPLE_BLOCK


def reference(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The first token whose cumulative mass exceeds u * total, in numpy fp64 over the whole row."""
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator).numpy()
    cdf = np.cumsum(probs.double().numpy(), axis=-1)
    return torch.from_numpy((cdf <= u * cdf[:, -1:]).sum(-1))


@pytest.mark.parametrize("vocab", [5, SAMPLE_BLOCK, 3 * SAMPLE_BLOCK + 17, 32000])
def test_draws_the_token_a_full_fp64_cumulative_sum_of_the_same_uniforms_gives(vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.randn(64, vocab, generator=g).mul(3).softmax(-1)
    probs[::3, : vocab // 2] = 0.0  # top-k/top-p style zeros, and unnormalised rows
    probs[1::4] *= 7.0
    state = g.get_state()
    ours = sample_categorical(probs, g)
    after = g.get_state()
    g.set_state(state)
    assert torch.equal(ours, reference(probs, g))
    assert torch.equal(g.get_state(), after)  # one uniform number per row, as the reference draws
    assert bool((probs.gather(1, ours[:, None]) > 0).all())


def test_frequencies_follow_the_probabilities_and_zero_mass_is_never_drawn():
    vocab = 2 * SAMPLE_BLOCK + 3  # three blocks, the last one padded
    p = torch.zeros(vocab)
    p[[0, 5, SAMPLE_BLOCK, SAMPLE_BLOCK + 1, vocab - 1]] = torch.tensor([0.1, 0.25, 0.05, 0.4, 0.2])
    n = 200_000
    draws = sample_categorical(p.expand(n, vocab), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=vocab).double() / n
    assert set(draws.unique().tolist()) == {0, 5, SAMPLE_BLOCK, SAMPLE_BLOCK + 1, vocab - 1}
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert bool(((freq - p.double()).abs() <= 5 * sigma + 1e-12).all()), (freq[p > 0], p[p > 0])


def test_one_token_with_mass_is_always_drawn_wherever_it_is():
    vocab = 3 * SAMPLE_BLOCK + 1
    for position in (0, SAMPLE_BLOCK - 1, SAMPLE_BLOCK, vocab - 1):
        probs = torch.zeros(1000, vocab)
        probs[:, position] = 1e-30  # tiny but positive
        assert bool((sample_categorical(probs, torch.Generator().manual_seed(position)) == position).all())


def test_same_seed_same_tokens():
    probs = torch.rand(16, 1000).softmax(-1)
    a = sample_categorical(probs, torch.Generator().manual_seed(3))
    b = sample_categorical(probs, torch.Generator().manual_seed(3))
    c = sample_categorical(probs, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
