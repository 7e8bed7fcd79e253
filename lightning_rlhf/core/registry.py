"""Registries of advantage estimators and policy losses: add your own without editing ``core/``.

A stage option names the function (``GRPOModule(advantage_estimator=...)``, ``policy_loss: ...`` in
PPO and GRPO); the name is looked up here when the module is built. Register a function under a
name with a decorator (as verl's ``register_adv_est``), in a module your run imports::

    from lightning_rlhf.core.registry import register_advantage_estimator

    @register_advantage_estimator("median_baseline", min_group_size=2)
    def median_baseline(rewards, group_size, *, scale_by_std=True):
        g = rewards.view(-1, group_size)                        # (num_prompts, G)
        return (g - g.median(dim=1, keepdim=True).values).reshape(-1)

A YAML may also give an import path (``advantage_estimator: my_project.estimators.median_baseline``):
an unknown name with a dot is imported (module, then attribute) and registered under that path, so
a command-line run needs no extra import. An unknown name raises :class:`~lightning_rlhf.errors.ConfigError`
listing the known ones.

Signatures (all tensors detached where marked constant):

- advantage estimator: ``fn(rewards, group_size, *, scale_by_std) -> advantages``; ``rewards`` ``(N,)``
  laid out as consecutive groups of ``group_size`` completions of one prompt; returns ``(N,)``
  sequence advantages (constant). The stage then sets the advantage of every flat group (all rewards
  equal, :func:`~lightning_rlhf.core.advantages.flat_groups`) to exactly 0, whatever the estimator.
- policy loss: ``fn(logprobs, old_logprobs, advantages, mask, *, clip_eps, clip_eps_high, dual_clip,
  agg, max_len, token_weights) -> (loss, stats)``, the signature of
  :func:`~lightning_rlhf.core.losses.ppo_policy_loss`; ``stats`` maps names to detached scalars, of
  which ``clipfrac``, ``approx_kl``, ``ratio_mean``, ``ratio_max`` are logged as ``train/<name>``
  when present (PPO's ``target_kl`` needs ``approx_kl``).

Imports torch, ``importlib`` (import paths) and ``lightning_rlhf.errors`` (standard library only), so
that an unknown name is a user error like every other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from lightning_rlhf.core.advantages import group_advantages
from lightning_rlhf.core.losses import ppo_policy_loss
from lightning_rlhf.errors import ConfigError


class Registered(NamedTuple):
    """A registered function and what the registry knows of it."""

    name: str
    fn: Callable
    min_group_size: int = 1
    """Advantage estimators: the smallest group (``num_generations``) it is defined for."""


class Registry:
    """Name -> function, with one clear error for a name it does not know."""

    def __init__(self, kind: str, decorator: str):
        self.kind = kind  # e.g. "advantage_estimator" (the option's name)
        self.decorator = decorator
        self._entries: dict[str, Registered] = {}

    def register(self, name: str, *, min_group_size: int = 1, override: bool = False) -> Callable:
        """Decorator: register the function under ``name``. Registering another function under a taken
        name raises unless ``override`` (the same function defined again replaces itself)."""

        def wrap(fn: Callable) -> Callable:
            if not callable(fn):
                raise TypeError(f"{self.decorator}({name!r}): {fn!r} is not callable")
            old = self._entries.get(name)
            # the same function defined again (a re-run notebook cell, a reloaded module) replaces itself
            redefined = old is not None and _qualname(old.fn) == _qualname(fn)
            if old is not None and old.fn is not fn and not redefined and not override:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered ({_qualname(old.fn)}); pick another name "
                    f"or pass override=True"
                )
            self._entries[name] = Registered(name, fn, min_group_size)
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, owner: str = "") -> Registered:
        """The entry of ``name``; an unknown name with a dot is imported (``pkg.module.fn``) and
        registered under it. Raises ``ConfigError`` naming the option and the known names."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        where = f"{owner} {self.kind}" if owner else self.kind
        if isinstance(name, str) and "." in name.strip("."):
            module_name, _, attr = name.replace(":", ".").rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(f"{where}={name!r}: cannot import module {module_name!r}: {err}") from err
            entry = self._entries.get(name)  # the module may register it under its path
            if entry is not None:
                return entry
            fn = getattr(module, attr, None)
            if not callable(fn):
                raise ConfigError(f"{where}={name!r}: module {module_name!r} has no callable {attr!r}")
            self.register(name)(fn)
            return self._entries[name]
        raise ConfigError(
            f"{where}={name!r} is not known; known: {', '.join(self.names())}. Register your own with "
            f"lightning_rlhf.core.registry.{self.decorator}(name) in a module the run imports, or give "
            "its import path (pkg.module.function)"
        )


ADVANTAGE_ESTIMATORS = Registry("advantage_estimator", "register_advantage_estimator")
POLICY_LOSSES = Registry("policy_loss", "register_policy_loss")


def register_advantage_estimator(name: str, *, min_group_size: int = 1, override: bool = False) -> Callable:
    """Decorator: register a group advantage estimator ``fn(rewards (N,), group_size, *, scale_by_std)
    -> (N,)`` under ``name`` (``min_group_size``: the smallest ``num_generations`` it accepts)."""
    return ADVANTAGE_ESTIMATORS.register(name, min_group_size=min_group_size, override=override)


def register_policy_loss(name: str, *, override: bool = False) -> Callable:
    """Decorator: register a policy loss with :func:`~lightning_rlhf.core.losses.ppo_policy_loss`'s
    signature under ``name``."""
    return POLICY_LOSSES.register(name, override=override)


def advantage_estimator(name: str, owner: str = "") -> Registered:
    """The registered advantage estimator ``name`` (``ConfigError`` listing the known ones if unknown)."""
    return ADVANTAGE_ESTIMATORS.get(name, owner)


def policy_loss(name: str, owner: str = "") -> Registered:
    """The registered policy loss ``name`` (``ConfigError`` listing the known ones if unknown)."""
    return POLICY_LOSSES.get(name, owner)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ------------------------------------------------------------------------------------ built-ins


def _group_estimator(method: str) -> Callable[..., Tensor]:
    def estimate(rewards: Tensor, group_size: int, *, scale_by_std: bool = True, moments: Tensor | None = None) -> Tensor:
        return group_advantages(rewards, group_size, method, scale_by_std, moments=moments)

    estimate.__name__ = estimate.__qualname__ = f"group_advantages_{method}"
    estimate.__doc__ = f"``group_advantages(rewards, group_size, {method!r}, scale_by_std, moments=moments)``."
    return estimate


register_advantage_estimator("grpo")(_group_estimator("grpo"))
register_advantage_estimator("rloo", min_group_size=2)(_group_estimator("rloo"))
register_advantage_estimator("reinforce_pp", min_group_size=2)(_group_estimator("reinforce_pp"))
register_policy_loss("ppo_clip")(ppo_policy_loss)
