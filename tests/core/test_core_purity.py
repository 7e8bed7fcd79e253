"""`lightning_rlhf.core` stays pure: only torch (and torch.nn.functional), no models or frameworks."""

import ast
import subprocess
import sys
from pathlib import Path

import lightning_rlhf.core as core

CORE_DIR = Path(core.__file__).parent
ALLOWED_ROOTS = {"__future__", "math", "typing", "torch", "lightning_rlhf", "importlib", "collections"}
# outside core, only the user-error family (standard library only): core.registry's unknown names
ALLOWED_PACKAGE_MODULES = {"lightning_rlhf.errors"}


def test_importing_core_pulls_in_no_framework():
    code = (
        "import sys, lightning_rlhf.core; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers', 'peft', 'datasets'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"lightning_rlhf.core imported: {out.stdout.strip()}"


def test_core_sources_import_only_torch_and_use_no_nn_modules():
    for path in sorted(CORE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED_ROOTS, f"{path.name} imports {name}"
                assert name in ("torch.nn.functional",) or not name.startswith("torch.nn"), (
                    f"{path.name}: {name}"
                )
                assert (
                    not name.startswith("lightning_rlhf")
                    or name.startswith("lightning_rlhf.core")
                    or name in ALLOWED_PACKAGE_MODULES
                ), name
        assert "nn.Module" not in path.read_text(), f"{path.name} uses torch.nn.Module"


def test_public_names_are_exported():
    for name in (
        "gae",
        "whiten",
        "group_advantages",
        "flat_groups",
        "kl_penalty",
        "token_rewards",
        "AdaptiveKLController",
        "FixedKLController",
        "aggregate_loss",
        "sft_loss",
        "reward_loss",
        "dpo_loss",
        "orpo_loss",
        "ppo_policy_loss",
        "value_loss",
        "logprobs_from_logits",
        "entropy_from_logits",
        "masked_mean",
        "masked_var",
        "masked_sum",
        "masked_moments",
        "moments_mean_var",
        "group_centred",
    ):
        assert name in core.__all__ and callable(getattr(core, name))
        assert getattr(core, name).__doc__, f"{name} has no docstring"
