"""Every tensor and random generator the package creates follows the model's device.

No GPU in CI, so this is enforced on the source: every call that makes a new tensor or generator
from nothing (``torch.Generator``, ``torch.zeros`` / ``ones`` / ``full`` / ``empty`` / ``arange`` /
``randperm`` / ``tensor`` / ``rand*`` / ``eye`` / ``linspace``) names a ``device=``. Tensors derived
from an existing one (``*_like``, ``x.new_*``) follow it by construction and are not checked. The
few places that must be on the CPU (a DataLoader's shuffling generator, a collator's batch, a cache
kept on the CPU) are listed in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_rlhf"

FACTORIES = {
    "Generator", "zeros", "ones", "full", "empty", "arange", "randperm", "tensor", "rand", "randn",
    "randint", "eye", "linspace", "as_tensor",
}  # fmt: skip

# (file relative to the package, enclosing function): why a CPU tensor is right there.
ALLOWED = {
    ("data/collate.py", "pad"): "collators build CPU batches; Lightning moves them to the device",
    ("data/collate.py", "__call__"): "collators build CPU batches; Lightning moves them to the device",
    ("data/datamodule.py", "train_dataloader"): "a DataLoader's shuffling generator must be on the CPU",
    ("rollout/vllm_engine.py", "generate"): "vLLM returns Python lists: the rows are assembled on the CPU "
    "and moved to the device once",
    ("rollout/scoring.py", "__call__"): "Python reward functions' scores, moved to the device by the stage",
    ("stages/dpo.py", "precompute_reference_logps"): "the reference log-prob cache lives on the CPU; "
    "rows are moved to the device when read",
}


def _creation_calls(tree: ast.AST):
    """``(function name, call)`` for each ``torch.<factory>(...)`` call, with its enclosing function."""
    stack: list[str] = []

    def visit(node):
        is_fn = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if is_fn:
            stack.append(node.name)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
        ):
            yield (stack[-1] if stack else "<module>"), node
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
        if is_fn:
            stack.pop()

    yield from visit(tree)


def _names_a_device(call: ast.Call) -> bool:
    """A ``device=`` keyword that is not the literal ``"cpu"`` (``device="cpu"`` is a CPU tensor on a
    CUDA run: exactly evaluation.py's old generator)."""
    for k in call.keywords:
        if k.arg == "device":
            return not (isinstance(k.value, ast.Constant) and k.value.value == "cpu")
    return False


def _violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn, call in _creation_calls(tree):
            if _names_a_device(call):
                continue
            if (rel, fn) in ALLOWED:
                continue
            out.append(f"{rel}:{call.lineno} in {fn}(): torch.{call.func.attr}(...) without device=")
    return out


def test_every_tensor_and_generator_the_package_creates_names_a_device():
    bad = _violations()
    assert not bad, "tensors/generators created without a device (CUDA runs would mix devices):\n" + "\n".join(bad)


def test_the_check_catches_a_cpu_generator(tmp_path):
    # the bug of issue 12, as evaluation.py had it: the check must flag it
    tree = ast.parse("import torch\ndef f(seed):\n    return torch.Generator(device='cpu') if 0 else torch.Generator()\n")
    calls = [c for _, c in _creation_calls(tree)]
    assert len(calls) == 2
    assert [_names_a_device(c) for c in calls] == [False, False]
    ok = ast.parse("import torch\ntorch.Generator(device=model_device)\n")
    assert [_names_a_device(c) for _, c in _creation_calls(ok)] == [True]


@pytest.mark.parametrize("entry", sorted(ALLOWED))
def test_every_allowed_exception_still_exists(entry):
    rel, fn = entry
    tree = ast.parse((PACKAGE / rel).read_text())
    assert any(f == fn for f, _ in _creation_calls(tree)), f"stale ALLOWED entry {entry}: remove it"


def _import_paths(node) -> list[str]:
    """Every ``class_path`` and dotted ``lightning_rlhf.`` function path in a parsed YAML tree."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "class_path":
                out.append(v)
            else:
                out.extend(_import_paths(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_import_paths(v))
    elif isinstance(node, str) and node.startswith("lightning_rlhf."):
        out.append(node)
    return out


DEMO_CONFIGS = sorted((PACKAGE.parent / "configs" / "demo").glob("*.yaml"))


@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: p.name)
def test_demo_configs_run_only_code_the_device_check_covers(config):
    """What a demo config runs on a GPU (stage, callbacks, reward functions) is package code, which
    the AST check above holds to the model's device; loggers are Lightning's own."""
    import yaml

    paths = _import_paths(yaml.safe_load(config.read_text()))
    assert paths, f"{config.name}: no class paths found (parser out of date?)"
    outside = [p for p in paths if not p.startswith(("lightning_rlhf.", "lightning.pytorch.loggers."))]
    assert not outside, f"{config.name} runs code outside the checked package: {outside}"
    evaluation = [p for p in paths if p == "lightning_rlhf.evaluation.PolicyEvaluation"]
    if config.name in ("sft.yaml", "ppo.yaml"):  # the callback that crashed on CUDA (issue 12)
        assert evaluation


def test_evaluation_sampling_generator_follows_the_policy_device(tiny_model_dir, prompt_file, monkeypatch):
    """evaluate_policy samples with a generator on the policy's device (the CUDA crash of issue 12)."""
    from lightning_rlhf import evaluation
    from lightning_rlhf.models import load_causal_lm, load_tokenizer

    seen = {}
    real = evaluation.generate

    def spy(model, *args, generator=None, **kwargs):
        seen["generator"] = generator.device
        seen["model"] = next(model.parameters()).device
        return real(model, *args, generator=generator, **kwargs)

    monkeypatch.setattr(evaluation, "generate", spy)
    policy = load_causal_lm(str(tiny_model_dir), trainable=False)
    reference = load_causal_lm(str(tiny_model_dir), trainable=False)
    res = evaluation.evaluate_policy(
        policy, load_tokenizer(tiny_model_dir), str(prompt_file), reference=reference,
        sampling=evaluation.SamplingSpec(num_samples=1, max_new_tokens=2), progress=False,
    )  # fmt: skip
    assert seen["generator"] == seen["model"] == torch.device("cpu")
    assert res["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
