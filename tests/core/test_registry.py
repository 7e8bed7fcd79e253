"""``core.registry``: built-ins registered by name, a user's estimator / loss added by decorator or
import path, one clear error for an unknown name (listing the known ones)."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.core import group_advantages, ppo_policy_loss, register_advantage_estimator, registry
from lightning_rlhf.errors import ConfigError, UserError


def test_builtins_are_registered_and_are_the_core_functions():
    assert {"grpo", "rloo", "reinforce_pp"} <= set(registry.ADVANTAGE_ESTIMATORS.names())
    assert registry.policy_loss("ppo_clip").fn is ppo_policy_loss
    r = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 5.0])
    for name in ("grpo", "rloo", "reinforce_pp"):
        got = registry.advantage_estimator(name).fn(r, 3, scale_by_std=False)
        assert torch.equal(got, group_advantages(r, 3, name, scale_by_std=False))
    assert registry.advantage_estimator("rloo").min_group_size == 2
    assert registry.advantage_estimator("grpo").min_group_size == 1


def test_unknown_name_is_one_user_error_listing_the_known_names():
    with pytest.raises(ConfigError) as err:
        registry.advantage_estimator("grpoo", "GRPOModule")
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "GRPOModule advantage_estimator='grpoo'" in msg and "grpo, reinforce_pp, rloo" in msg
    assert "register_advantage_estimator" in msg
    with pytest.raises(ConfigError, match="policy_loss='nope'.*ppo_clip"):
        registry.policy_loss("nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg'"):
        registry.policy_loss("no_such_pkg.loss")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        registry.policy_loss("lightning_rlhf.core.losses.nope")


def test_register_by_decorator_and_by_import_path():
    @register_advantage_estimator("test_registry_mean_baseline")
    def mean_baseline(rewards, group_size, *, scale_by_std=True):
        return (rewards.view(-1, group_size) - 1.0).reshape(-1)

    assert registry.advantage_estimator("test_registry_mean_baseline").fn is mean_baseline
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("test_registry_mean_baseline")(lambda r, g, **_: r)
    assert registry.advantage_estimator("test_registry_mean_baseline").fn is mean_baseline

    @register_advantage_estimator("test_registry_mean_baseline")  # defined again (a re-run cell)
    def mean_baseline(rewards, group_size, *, scale_by_std=True):
        return rewards

    assert registry.advantage_estimator("test_registry_mean_baseline").fn is mean_baseline  # the new one
    # an import path is imported and registered under it
    entry = registry.policy_loss("lightning_rlhf.core.losses.ppo_policy_loss")
    assert entry.fn is ppo_policy_loss
    assert "lightning_rlhf.core.losses.ppo_policy_loss" in registry.POLICY_LOSSES.names()
