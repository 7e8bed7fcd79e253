"""Hugging Face Hub names: a model or dataset given as ``org/name`` instead of a local folder.

A name that is not an existing path is resolved through the Hugging Face cache with
``huggingface_hub.snapshot_download``: downloaded where there is a network, read from the cache
(``HF_HOME`` / ``HF_HUB_CACHE``) when ``HF_HUB_OFFLINE=1``. Either way the rest of the package sees
a local folder. A leaf module (no package imports), so that every layer can use it.
"""

from __future__ import annotations

import os
import re

# What a model needs: config, weights (safetensors), tokenizer, chat template, generation config.
# Not the .bin / .pth / .onnx / .gguf copies many repos carry besides safetensors.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubNameError(ValueError):
    """A name that is neither a local path nor a Hub repository reachable here (or in the cache)."""


def is_hub_name(name: str) -> bool:
    """``org/name`` (or ``name``) that is not an existing local path."""
    return not os.path.exists(name) and bool(_REPO_ID.match(name)) and ".." not in name


def snapshot(name: str, *, repo_type: str = "model", what: str = "model") -> str:
    """The local folder of Hub repository ``name`` (a cached snapshot, downloaded when online).

    Raises:
        HubNameError: one message naming ``name``, whether the Hub was reachable, and where the cache is.
    """
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(
            name, repo_type=repo_type, allow_patterns=MODEL_FILES if repo_type == "model" else None
        )
    except Exception as e:  # noqa: BLE001 - every way of not finding it gets the same clear message
        where = (
            f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it"
            if offline
            else f"could not be fetched from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]})"
        )
        raise HubNameError(f"{what} {name!r}: not a local folder, and as a Hub {repo_type} id it is {where}") from None
