"""A memory planner: per-GPU bytes of every model a stage holds, from a model's config alone.

    lightning-rlhf plan-memory --model llama-3-70b --stage ppo --lora --gpus 8 --fsdp --batch 4 --seq 1024

Pure arithmetic on a Llama-style Hugging Face config (a folder's ``config.json`` or a preset name): no
model is built and nothing is downloaded. For each role of the stage (policy, reference, critic,
reward model) it prints weights, gradients, optimizer state and activations per GPU, then the total.

Which models a stage holds follows ``lightning_rlhf/stages``:

- ``sft``: the policy (trained).
- ``reward``: the reward model, a one-label sequence classifier (trained; with LoRA its ``score``
  head is trained in full, peft's ``modules_to_save``).
- ``dpo``: the policy (trained) and a frozen reference: a copy for a full policy, none for a LoRA
  policy (the reference is the policy with its adapter disabled), none with ``precompute_ref_logps``
  or a reference-free loss.
- ``ppo``: policy and critic (trained), reference and reward model (frozen). The critic is a
  sequence classifier with the policy's LoRA/4-bit settings; ``share_backbone``: only a value head on
  the policy. The reference: a copy, none with LoRA (adapter off) or ``kl_coef: 0``.
- ``grpo``: as PPO without a critic; no reference with ``beta: 0``.

Bytes per parameter (``dtype`` is the compute dtype):

- trained, full: ``bf16``/``fp16``: weights 2 + gradients 2 + optimizer 12 (fp32 master weights and
  AdamW's two fp32 moments), the usual 16 bytes of mixed precision (Rajbhandari et al., ZeRO, 2020).
  Lightning's ``precision: bf16-mixed`` over fp32 parameters stores the same 16 bytes as weights 4 +
  gradients 4 + moments 8. ``fp32``: 4 + 4 + 8. (Pure ``bf16-true`` with bf16 parameters keeps torch's
  AdamW moments in bf16: 8 bytes in all; the planner does not model that setup.)
- LoRA adapters: 16 bytes per adapter parameter (peft keeps adapters in fp32: 4 + 4 + 8); the base:
  weights only.
- QLoRA: the base's linear layers in NF4, 0.5 byte per parameter plus quantisation constants
  (bitsandbytes' double quantisation: one 8-bit absmax per 64 weights and one fp32 constant per 256
  blocks, ~0.0159 byte per parameter); embeddings, norms and the LM head are left unquantised and
  ``prepare_model_for_kbit_training`` casts them to fp32 (4 bytes).
- frozen: weights only, in ``dtype``.

Activations of one micro-batch of ``B`` rows of ``T`` tokens (DPO: ``2B`` rows, chosen and rejected),
``s`` bytes per activation element (2 in bf16/fp16, 4 in fp32). Per decoder layer, what autograd keeps
for the backward (Korthikanti et al. 2022, "Reducing activation recomputation", counted for a Llama
block: RMSNorm, SDPA attention with grouped KV heads, SwiGLU MLP, no dropout)::

    layer = s * B * T * (8h + 2 * h_kv + 4i)     fp32: two RMSNorms keep input, normalised and output
                                                 (6h; the outputs are the q/k/v and MLP inputs), q h,
                                                 k and v 2 h_kv, attention output h; gate, up, silu
                                                 and product 4i
    layer = s * B * T * (10h + 2 * h_kv + 4i)    bf16/fp16: each RMSNorm also keeps its fp32 upcast
    (+ s * B * a * T^2 * 2.5 for eager attention: scores and softmax, Korthikanti's 5aT^2 in bf16)

(Korthikanti's GPT block is 34h + 5aT per token in bf16; this count is checked against the tensors
autograd saves for a real ``LlamaDecoderLayer`` in ``tests/test_memory.py``.)

``h`` the hidden size, ``h_kv`` the key/value width, ``i`` the MLP width, ``a`` the heads. With
gradient checkpointing each layer keeps only its input (``s * B * T * h``) and one layer is recomputed
at a time. The LM head adds its logits and their gradient, ``2 * s * B * T * V`` (the log-probs are
taken chunk by chunk in fp32, ``core.logprobs_from_logits``, so no full fp32 copy). A sequence
classifier's head adds nothing that matters. Frozen models run under ``no_grad``: one layer at a time,
not counted. Online stages also sample: the rollout's KV cache, ``2 * L * h_kv * s * B * T``, is held
while generating, not during the backward, so the peak takes the larger of the two.

FSDP2 over ``N`` GPUs (``--fsdp``) divides every model's weights, gradients and optimizer state by
``N``, the frozen reference and reward model included (``fully_shard`` on each decoder layer, then
the root). It adds the unsharded working set: the root's parameters (embeddings, final norm, head:
the root stays gathered between its forward and backward) and two decoder layers (the one computing
and the prefetched one) of the largest model, in ``dtype``. Activations are not sharded: each GPU
runs its own micro-batch. DDP (``--gpus N`` without ``--fsdp``) replicates everything. (Sharding the
frozen models is what ``StageModule.shard`` is for; a stage that leaves a frozen model unsharded
pays its full weights on every GPU.)

What it leaves out: the CUDA context and allocator fragmentation (budget ~1-3 GiB per GPU), temporary
buffers of the optimizer step, NCCL buffers, a colocated vLLM engine's own memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 2**30

PRESETS: dict[str, dict] = {
    # Llama-2 (Touvron et al. 2023) and Llama-3 (Meta 2024) as in their config.json files
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip
PRESETS["7b"] = PRESETS["llama-2-7b"]
PRESETS["70b"] = PRESETS["llama-3-70b"]

STAGES = ("sft", "reward", "dpo", "ppo", "grpo")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16-mixed": "bf16", "32": "fp32"}
# bitsandbytes NF4 with double quantisation, blocksize 64: 4 bits + an 8-bit absmax per 64 weights +
# an fp32 second-level constant per 256 blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


class PlanError(ValueError):
    """A model or option the planner cannot plan for (a user's mistake: one clear message)."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Biases on q, k, v and o (Llama's ``attention_bias``)."""
    qkv_bias: bool = False
    """Biases on q, k, v only (Qwen2)."""
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> ModelShape:
        """From a ``config.json`` dict (a multimodal config's ``text_config`` is used when present)."""
        config = dict(config.get("text_config") or config)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in config]  # fmt: skip
        if missing:
            raise PlanError(f"{where}: not a Llama-style decoder config, missing {', '.join(missing)}")
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            qkv_bias=config.get("model_type") == "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    @classmethod
    def load(cls, model: str) -> ModelShape:
        """A preset name (``llama-2-7b``, ``llama-3-70b``, ``7b``, ``70b``, ...) or a folder with ``config.json``."""
        if model.lower() in PRESETS:
            preset = dict(PRESETS[model.lower()])
            return cls.from_config(preset, where=model)
        path = Path(model)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise PlanError(
                f"{model}: neither a preset ({', '.join(sorted(PRESETS))}) nor a folder with config.json"
            )
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{file}: not valid JSON ({e})") from None
        return cls.from_config(config, where=str(file))

    # ------------------------------------------------------------------------------ parameters

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, in_features, out_features)`` of one decoder layer's linear layers."""
        h, i = self.hidden_size, self.intermediate_size
        return [
            ("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
        ]  # fmt: skip

    def layer_linear_params(self) -> int:
        return sum(a * b for _, a, b in self.linears())

    def layer_params(self) -> int:
        """Parameters of one decoder layer: linears, their biases, two RMSNorms."""
        h = self.hidden_size
        bias = 0
        if self.attention_bias:
            bias += self.q_dim + 2 * self.kv_dim + h
        elif self.qkv_bias:
            bias += self.q_dim + 2 * self.kv_dim
        if self.mlp_bias:
            bias += 2 * self.intermediate_size + h
        return self.layer_linear_params() + bias + 2 * h

    def head_params(self, head: str) -> int:
        """``lm``: the LM head (0 when tied to the embeddings); ``score``: a one-label head, no bias."""
        if head == "score":
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def root_params(self, head: str) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, head."""
        return self.vocab_size * self.hidden_size + self.hidden_size + self.head_params(head)

    def num_params(self, head: str = "lm") -> int:
        """All parameters of ``*ForCausalLM`` (``head="lm"``) or a one-label
        ``*ForSequenceClassification`` (``head="score"``): ``sum(p.numel())`` of the real model."""
        return self.num_hidden_layers * self.layer_params() + self.root_params(head)

    def lora_params(self, r: int, head: str = "lm") -> int:
        """Trainable parameters of peft's LoRA on ``all-linear`` (every decoder linear, not the LM
        head), ``r * (in + out)`` each; a sequence classifier's ``score`` head is trained in full
        (peft's ``modules_to_save`` for ``SEQ_CLS``)."""
        per_layer = sum(r * (a + b) for _, a, b in self.linears())
        return self.num_hidden_layers * per_layer + (self.head_params("score") if head == "score" else 0)

    def quantized_params(self) -> int:
        """Parameters bitsandbytes stores in 4 bits: the decoder layers' linear weights."""
        return self.num_hidden_layers * self.layer_linear_params()

    # ------------------------------------------------------------------------------ activations

    def layer_activation_elems(self, eager_attention: bool, seq: int, half: bool = True) -> float:
        """Elements per token one decoder layer keeps for the backward (see the module docstring);
        ``half``: bf16/fp16 (the RMSNorms then also keep an fp32 copy of their input, 2 elements each)."""
        h, i = self.hidden_size, self.intermediate_size
        elems = (10 if half else 8) * h + 2 * self.kv_dim + 4 * i
        if eager_attention:
            elems += 2.5 * self.num_attention_heads * seq
        return elems


@dataclass
class Setup:
    """What is planned: a stage, how its models are trained, on how many GPUs, with what batch."""

    stage: str = "sft"
    """``sft``, ``reward``, ``dpo``, ``ppo`` or ``grpo``."""
    lora: bool = False
    """Train LoRA adapters on every decoder linear (``all-linear``) of a frozen base."""
    qlora: bool = False
    """LoRA on a 4-bit NF4 base (implies ``lora``)."""
    lora_r: int = 16
    """LoRA rank."""
    gpus: int = 1
    """GPUs (processes) over all nodes."""
    fsdp: bool = False
    """FSDP2 over ``gpus`` (else DDP: every GPU holds everything)."""
    dtype: str = "bf16"
    """Compute dtype: ``bf16``/``fp16`` (mixed precision, fp32 master weights) or ``fp32``."""
    batch: int = 1
    """Micro-batch rows per GPU (DPO: preference pairs, i.e. 2x rows)."""
    seq: int = 1024
    """Tokens per row (prompt + response)."""
    gradient_checkpointing: bool = False
    """Keep one hidden state per layer; recompute a layer at a time in the backward."""
    eager_attention: bool = False
    """Attention scores are kept (no SDPA/flash kernel): adds ``2.5 * a * T`` elements per token."""
    share_backbone: bool = False
    """PPO: a value head on the policy instead of a separate critic."""
    reward_model: bool = True
    """PPO/GRPO: a reward model (False: reward functions only)."""
    kl_coef: float | None = None
    """PPO ``kl_coef`` / GRPO ``beta`` (0: no reference). None: the stage's default (0.05 / 0.04)."""
    precompute_ref: bool = False
    """DPO: reference log-probs precomputed, reference freed (also: a reference-free loss)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, for the fits check."""

    def __post_init__(self):
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.stage not in STAGES:
            raise PlanError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.qlora:
            self.lora = True
        for name in ("gpus", "batch", "seq", "lora_r"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Role:
    """One model of the stage, bytes per GPU."""

    role: str
    kind: str
    """``trained``, ``frozen`` or why there is no copy (``adapter off``, ...)."""
    params: int = 0
    trainable: int = 0
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class Plan:
    setup: Setup
    shape: ModelShape
    roles: list[Role] = field(default_factory=list)
    fsdp_buffers: float = 0.0
    """Unsharded working set of FSDP2 (root parameters and two layers of the largest model)."""
    kv_cache: float = 0.0
    """The rollout's KV cache (online stages): held while sampling, not during the backward."""

    @property
    def static(self) -> float:
        return sum(r.weights + r.grads + r.optimizer for r in self.roles) + self.fsdp_buffers

    @property
    def activations(self) -> float:
        return sum(r.activations for r in self.roles)

    @property
    def total(self) -> float:
        """Peak per GPU: static state plus the larger of training activations and the KV cache."""
        return self.static + max(self.activations, self.kv_cache)

    @property
    def fits(self) -> bool:
        return self.total <= self.setup.gpu_memory_gib * GiB

    def as_dict(self) -> dict:
        return {
            "setup": asdict(self.setup),
            "roles": [dict(asdict(r), total=r.total) for r in self.roles],
            "fsdp_buffers": self.fsdp_buffers,
            "kv_cache": self.kv_cache,
            "total": self.total,
            "fits": self.fits,
        }


def _trained(shape: ModelShape, s: Setup, role: str, head: str) -> Role:
    """A trained model: full, LoRA or QLoRA, sharded over the GPUs with FSDP2."""
    w = DTYPE_BYTES[s.dtype]
    shard = s.gpus if s.fsdp else 1
    params = shape.num_params(head)
    mixed = w < 4  # bf16/fp16: fp32 master weights in the optimizer
    if not s.lora:
        per_param_opt = 8 + (4 if mixed else 0)
        return Role(role, "trained", params, params, params * w / shard, params * w / shard,
                    params * per_param_opt / shard)  # fmt: skip
    adapters = shape.lora_params(s.lora_r, head)
    if s.qlora:
        quantized = shape.quantized_params()
        base = quantized * NF4_BYTES + (params - quantized) * 4  # unquantised parts cast to fp32
    else:
        base = params * w
    # adapters (and a score head under modules_to_save) in fp32: weights 4, grads 4, moments 8
    return Role(role, "trained (QLoRA)" if s.qlora else "trained (LoRA)", params + adapters, adapters,
                (base + adapters * 4) / shard, adapters * 4 / shard, adapters * 8 / shard)  # fmt: skip


def _frozen(shape: ModelShape, s: Setup, role: str, head: str) -> Role:
    shard = s.gpus if s.fsdp else 1
    params = shape.num_params(head)
    return Role(role, "frozen", params, 0, params * DTYPE_BYTES[s.dtype] / shard)


def _activations(shape: ModelShape, s: Setup, rows: int, head: str) -> float:
    """Bytes one trained model keeps for its backward over ``rows`` x ``seq`` tokens."""
    act = 2 if s.dtype in ("bf16", "fp16") else 4
    tokens = rows * s.seq
    layer = act * tokens * shape.layer_activation_elems(s.eager_attention, s.seq, half=act == 2)
    if s.gradient_checkpointing:
        body = shape.num_hidden_layers * act * tokens * shape.hidden_size + layer
    else:
        body = shape.num_hidden_layers * layer
    logits = 2 * act * tokens * shape.vocab_size if head == "lm" else 0
    return body + logits


def plan(shape: ModelShape, s: Setup) -> Plan:
    """Per-GPU memory of every model ``s.stage`` holds (see the module docstring for the rules)."""
    p = Plan(s, shape)
    rows = 2 * s.batch if s.stage == "dpo" else s.batch
    if s.stage == "reward":
        trained = _trained(shape, s, "reward model", "score")
        trained.activations = _activations(shape, s, rows, "score")
        p.roles.append(trained)
    else:
        policy = _trained(shape, s, "policy", "lm")
        policy.activations = _activations(shape, s, rows, "lm")
        p.roles.append(policy)
    if s.stage == "dpo":
        if s.precompute_ref:
            p.roles.append(Role("reference", "precomputed (freed)"))
        elif s.lora:
            p.roles.append(Role("reference", "adapter off (no copy)"))
        else:
            p.roles.append(_frozen(shape, s, "reference", "lm"))
    if s.stage in ("ppo", "grpo"):
        kl = s.kl_coef if s.kl_coef is not None else (0.05 if s.stage == "ppo" else 0.04)
        if kl <= 0:
            p.roles.append(Role("reference", "none (no KL)"))
        elif s.lora:
            p.roles.append(Role("reference", "adapter off (no copy)"))
        else:
            p.roles.append(_frozen(shape, s, "reference", "lm"))
    if s.stage == "ppo":
        if s.share_backbone:
            head = shape.hidden_size + 1  # ValueHead: Linear(h, 1) in the policy's dtype, trained
            shard = s.gpus if s.fsdp else 1
            w = DTYPE_BYTES[s.dtype]
            p.roles.append(Role("critic", "value head on policy", head, head, head * w / shard, head * w / shard,
                                head * (8 + (4 if w < 4 else 0)) / shard))  # fmt: skip
        else:
            critic = _trained(shape, s, "critic", "score")
            critic.activations = _activations(shape, s, rows, "score")
            p.roles.append(critic)
    if s.stage in ("ppo", "grpo"):
        if s.reward_model:
            p.roles.append(_frozen(shape, s, "reward model", "score"))
        else:
            p.roles.append(Role("reward model", "none (functions)"))
        act = 2 if s.dtype in ("bf16", "fp16") else 4
        p.kv_cache = 2 * shape.num_hidden_layers * shape.kv_dim * act * s.batch * s.seq
    if s.fsdp:
        p.fsdp_buffers = max(_unsharded(shape, s, r) for r in p.roles if r.params) * (1 - 1 / s.gpus)
    return p


def _unsharded(shape: ModelShape, s: Setup, r: Role) -> float:
    """Bytes of one model's FSDP2 working set: its root (embeddings, final norm, head) and two layers."""
    head = "score" if r.role in ("critic", "reward model") else "lm"
    w = DTYPE_BYTES[s.dtype]
    if s.qlora and r.trainable:  # 4-bit layers; root cast to fp32 by prepare_model_for_kbit_training
        return shape.root_params(head) * 4 + 2 * shape.layer_params() * NF4_BYTES
    return (shape.root_params(head) + 2 * shape.layer_params()) * w


# ---------------------------------------------------------------------------------------- printing


def _count(n: int) -> str:
    return "-" if not n else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M")


def format_plan(p: Plan) -> str:
    s = p.setup
    unit, unit_name = (GiB, "GiB") if p.total >= GiB else (2**20, "MiB")

    def mem(x: float) -> str:
        return "-" if x == 0 else f"{x / unit:.2f}"

    how = "QLoRA" if s.qlora else ("LoRA" if s.lora else "full")
    par = f"FSDP2 over {s.gpus}" if s.fsdp else (f"DDP x{s.gpus}" if s.gpus > 1 else "1 GPU")
    ckpt = ", gradient checkpointing" if s.gradient_checkpointing else ""
    rows = f"{2 * s.batch} rows ({s.batch} pairs)" if s.stage == "dpo" else f"{s.batch} rows"
    lines = [
        f"{s.stage.upper()}, {how}, {par}, {s.dtype}; micro-batch {rows} x {s.seq} tokens{ckpt}",
        f"{_count(p.shape.num_params('lm'))} parameters (causal LM); {unit_name} per GPU",
        "",
        f"{'role':<13}{'model':<24}{'params':>9}{'trained':>9}{'weights':>9}{'grads':>8}{'optim':>8}"
        f"{'activ.':>8}{'total':>8}",
    ]
    for r in p.roles:
        lines.append(
            f"{r.role:<13}{r.kind:<24}{_count(r.params):>9}{_count(r.trainable):>9}{mem(r.weights):>9}"
            f"{mem(r.grads):>8}{mem(r.optimizer):>8}{mem(r.activations):>8}{mem(r.total):>8}"
        )
    if p.fsdp_buffers:
        lines.append(f"{'FSDP2 unsharded root + 2 layers':<63}{mem(p.fsdp_buffers):>25}")
    if p.kv_cache:
        lines.append(f"{'rollout KV cache (while sampling, not with activations)':<63}{mem(p.kv_cache):>25}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(
        f"{'peak per GPU = static + max(activations, KV cache)':<63}{mem(p.total):>25}"
        f"   {verdict} in {s.gpu_memory_gib:g} GiB"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lightning-rlhf plan-memory",
        description="Per-GPU memory of the models a stage holds (weights, gradients, optimizer, activations), "
        "from a model's config alone. Formulas and assumptions: the docstring of lightning_rlhf/memory.py.",
    )
    ap.add_argument(
        "--model", required=True, help=f"folder with config.json, or a preset: {', '.join(PRESETS)}"
    )
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (all-linear) on a frozen base")
    ap.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit NF4 base (implies --lora)")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (processes) in all, over every node")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (ModelParallelStrategy) over --gpus; else DDP")
    ap.add_argument(
        "--dtype", default="bf16", help="compute dtype: bf16 (mixed, fp32 master weights), fp16, fp32"
    )
    ap.add_argument("--batch", type=int, default=1, help="micro-batch rows per GPU (DPO: pairs)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row (prompt + response)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--eager-attention", action="store_true", help="attention scores kept (no SDPA/flash)")
    ap.add_argument("--share-backbone", action="store_true", help="PPO: value head on the policy, no critic")
    ap.add_argument("--no-reward-model", action="store_true", help="PPO/GRPO: reward functions only")
    ap.add_argument("--kl-coef", "--beta", dest="kl_coef", type=float, default=None,
                    help="PPO kl_coef / GRPO beta; 0: no reference model (default 0.05 / 0.04)")  # fmt: skip
    ap.add_argument("--precompute-ref", action="store_true", help="DPO: precomputed reference log-probs")
    ap.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU for the fits check (default 80)"
    )
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def setup_from_args(args: argparse.Namespace) -> Setup:
    return Setup(
        stage=args.stage, lora=args.lora, qlora=args.qlora, lora_r=args.lora_r, gpus=args.gpus, fsdp=args.fsdp,
        dtype=args.dtype, batch=args.batch, seq=args.seq, gradient_checkpointing=args.gradient_checkpointing,
        eager_attention=args.eager_attention, share_backbone=args.share_backbone,
        reward_model=not args.no_reward_model, kl_coef=args.kl_coef, precompute_ref=args.precompute_ref,
        gpu_memory_gib=args.gpu_memory,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Plan:
    args = build_parser().parse_args(argv)
    try:
        p = plan(ModelShape.load(args.model), setup_from_args(args))
    except PlanError as e:
        sys.exit(f"plan-memory: {e}")
    print(json.dumps(p.as_dict(), indent=2) if args.json else format_plan(p))
    return p


def readme_table(models: tuple[str, ...] = ("llama-2-7b", "llama-3-70b"), gpus: int = 8, batch: int = 1,
                 seq: int = 2048) -> str:  # fmt: skip
    """The README's table: PPO/GRPO/DPO x full/LoRA/QLoRA, FSDP2 over ``gpus`` x 80 GB."""
    out = [
        "| model | stage | setup | policy | reference | critic | reward | peak / GPU | fits 80 GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for model in models:
        shape = ModelShape.load(model)
        for stage in ("ppo", "grpo", "dpo"):
            for how in ("full", "lora", "qlora"):
                s = Setup(stage=stage, lora=how != "full", qlora=how == "qlora", gpus=gpus, fsdp=True, batch=batch,
                          seq=seq, gradient_checkpointing=True)  # fmt: skip
                p = plan(shape, s)
                by = {r.role: r for r in p.roles}

                def cell(role: str, by: dict = by) -> str:
                    r = by.get(role)
                    if r is None:
                        return ""
                    return f"{r.total / GiB:.1f}" if r.total else r.kind.replace(" (no copy)", "")

                out.append(
                    f"| {model} | {stage} | {how} | {cell('policy')} | {cell('reference')} | {cell('critic')} | "
                    f"{cell('reward model')} | {p.total / GiB:.1f} | {'yes' if p.fits else 'no'} |"
                )
    return "\n".join(out)


__all__ = [
    "PRESETS",
    "ModelShape",
    "Plan",
    "PlanError",
    "Role",
    "Setup",
    "format_plan",
    "main",
    "plan",
    "readme_table",
]


if __name__ == "__main__":  # python -m lightning_rlhf.memory: the README's table
    print(readme_table())
