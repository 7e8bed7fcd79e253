"""``ResumableDataLoader``'s position, with and without shuffling: mid-epoch it resumes at the next
batch of the same order; after the epoch's last batch it is the next epoch's start."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.data.datamodule import ResumableDataLoader


def loader(shuffle: bool) -> ResumableDataLoader:
    g = torch.Generator().manual_seed(0) if shuffle else None
    return ResumableDataLoader(list(range(6)), batch_size=2, shuffle=shuffle, generator=g)


@pytest.mark.parametrize("shuffle", [False, True])
def test_mid_epoch_state_resumes_at_the_next_batch(shuffle):
    first = loader(shuffle)
    it = iter(first)
    seen = [next(it).tolist()]
    state = first.state_dict()
    assert state["consumed"] == 1
    straight = seen + [b.tolist() for b in it]  # the rest of the same epoch
    resumed = loader(shuffle)
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == straight


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_after_the_last_batch_is_the_next_epochs_start(shuffle):
    first = loader(shuffle)
    assert [b.tolist() for b in first]  # one whole epoch
    state = first.state_dict()
    assert state["consumed"] == 0
    next_epoch = [b.tolist() for b in first]  # what the straight run trains on next
    resumed = loader(shuffle)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == next_epoch  # not an empty (replayed) epoch
