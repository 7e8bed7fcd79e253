"""User mistakes: one exception family, one check for model folders, one way the CLI reports them.

Every error a user can fix (bad data, a bad config value, a missing model folder, a reward function
that misbehaves) is a :class:`UserError`, a ``ValueError`` subclass whose message names the file,
record/line and field (or the option). The command line prints the message alone on stderr and exits
non-zero; ``--debug`` or ``LIGHTNING_RLHF_DEBUG=1`` shows the traceback as well.

This module imports nothing heavy: the data layer and the CLI's fast paths use it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

DEBUG_ENV = "LIGHTNING_RLHF_DEBUG"


class UserError(ValueError):
    """A mistake in the user's data, config, paths or functions; the message says what and where."""


class ConfigError(UserError):
    """A bad option value or path in a config (the message names the option)."""


class RewardFunctionError(UserError):
    """A reward function raised, or returned something else than one number (or None) per completion."""


class NonFiniteError(UserError):
    """A loss, gradient or weight is NaN or infinite (and the run was told to stop, or is about to save it)."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint at ``path`` (not a mistake: the CLI says where)."""

    def __init__(self, path: str, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint saved to {path} "
                         f"(resume with --ckpt_path {path})")
        self.path, self.step = path, step


MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_local(path: str) -> bool:
    """True when ``path`` cannot be a Hugging Face Hub id (``name`` or ``namespace/name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def _in_hub_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return True
    for name in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except Exception:  # an id that is not valid for the Hub
            return False
    return False


def check_model_path(path: str | os.PathLike, option: str, *, tokenizer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``path`` is a model (or tokenizer) folder or a usable Hub id.

    A folder must hold ``config.json`` (or ``adapter_config.json``; tokenizer files for a tokenizer).
    A name that is not a folder is taken as a Hub id: it must look like one, and with
    ``HF_HUB_OFFLINE=1`` it must be in the local Hugging Face cache.
    """
    p = os.fspath(path)
    if not p:
        return  # the loader reports an empty path with its own message
    files = TOKENIZER_FILES if tokenizer else MODEL_FILES
    what = "tokenizer" if tokenizer else "model"
    from .models.loader import GGUF_SHORTHANDS, is_gguf

    if is_gguf(p):  # a GGUF file (or a shorthand for one shipped in a package): converted when loaded
        if p in GGUF_SHORTHANDS:
            module, _, pip_name = GGUF_SHORTHANDS[p]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{option}: {p!r} needs the package {pip_name} (pip install {pip_name})")
        elif not os.path.isfile(p):
            raise ConfigError(f"{option}: GGUF file {p} does not exist")
        return
    if os.path.isdir(p):
        if not any((Path(p) / f).exists() for f in files):
            raise ConfigError(f"{option}: {p} is a folder but holds no {what} (none of {', '.join(files)})")
        return
    if os.path.exists(p):
        raise ConfigError(f"{option}: {p} is a file; expected a {what} folder")
    if _looks_local(p):
        raise ConfigError(f"{option}: {what} folder {p} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and not _in_hub_cache(p, files):
        raise ConfigError(
            f"{option}: {p} is not a folder, and no Hugging Face Hub {what} of that id is in the local cache "
            "(HF_HUB_OFFLINE=1)"
        )


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``(debug, argv without --debug)``; ``--debug`` also sets the environment variable for child processes."""
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    if debug:
        os.environ[DEBUG_ENV] = "1"
    return debug, [a for a in argv if a != "--debug"]


UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def strip_union_report(message: str) -> str:
    """jsonargparse reports an error inside a class it instantiates as a union report (subtypes, the
    value given, ...): keep only the error lines themselves."""
    if UNION_NOISE[0] not in message:
        return message
    lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith("Parser key") and not any(n in ln for n in UNION_NOISE)]
    return "\n".join(kept) or message


@contextlib.contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn a user mistake (any ``ValueError``, :class:`UserError` included) into ``error: <message>``
    on stderr and exit code 2; with ``debug`` the exception propagates with its traceback."""
    try:
        yield
    except ValueError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {strip_union_report(str(e))}\n(run with --debug or {DEBUG_ENV}=1 for the traceback)\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
