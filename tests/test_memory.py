"""The memory planner (``lightning_rlhf.memory``, ``lightning-rlhf plan-memory``) against real models.

What is deterministic is checked exactly: parameter counts against ``sum(p.numel())`` of real
transformers models (tiny ones, and the 7B/70B presets on the meta device), LoRA counts against peft,
weight and AdamW-state bytes against the project's own loader and optimiser after one step, and the
per-layer activation count against the tensors autograd saves. Peak RSS of whole training steps is
noisy and measured by ``scripts/bench_ppo_memory.py``, not here.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    Qwen2Config,
)

from lightning_rlhf.cli import main as cli
from lightning_rlhf.memory import NF4_BYTES, PRESETS, GiB, ModelShape, PlanError, Setup, plan

CONFIGS = {
    "gqa_untied": LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": LlamaConfig(vocab_size=123, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True),
    "head_dim_and_biases": LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip


def numel(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shape_of(config) -> ModelShape:
    return ModelShape.from_config(config.to_dict())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_equals_the_real_models(name):
    config = CONFIGS[name]
    shape = shape_of(config)
    assert shape.num_params("lm") == numel(AutoModelForCausalLM.from_config(config))
    config = config.__class__(**{**config.to_dict(), "num_labels": 1})
    assert shape.num_params("score") == numel(AutoModelForSequenceClassification.from_config(config))


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b"])
def test_preset_parameter_count_equals_the_real_model_on_meta(preset):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**PRESETS[preset]))
    assert ModelShape.load(preset).num_params() == numel(model)
    if preset == "llama-2-7b":
        assert numel(model) == 6_738_415_616  # the published count


def test_demo_folder_loads_and_counts_as_the_loader_builds_it(tmp_path):
    from lightning_rlhf.demo.assets import tokenizer_dir
    from lightning_rlhf.models import load_causal_lm

    shape = ModelShape.load(str(tokenizer_dir()))
    assert shape.tie_word_embeddings and shape.num_key_value_heads == 2
    assert shape.num_params() == numel(load_causal_lm(str(tokenizer_dir())))


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_lora_parameter_count_equals_peft(r, task):
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(**{**CONFIGS["gqa_untied"].to_dict(), "num_labels": 1})
    auto = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    model = get_peft_model(
        auto.from_config(config), LoraConfig(r=r, target_modules="all-linear", task_type=task)
    )
    head = "lm" if task == "CAUSAL_LM" else "score"
    assert shape_of(config).lora_params(r, head) == numel(model, trainable=True)


@pytest.mark.parametrize("dtype, planned", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_weight_gradient_and_adamw_bytes_equal_a_real_step(tmp_path, tiny_model_dir, dtype, planned):
    """Full fine-tuning through the project's loader and optimiser: weights and gradients in the
    model's dtype; AdamW's state after one step is 8 bytes per parameter for fp32 (two moments). In
    bf16 the plan is mixed precision (fp32 master + fp32 moments, 12 bytes): torch's AdamW on bf16
    parameters keeps bf16 moments, which the planner states it does not model."""
    from lightning_rlhf.models import ModelSpec, load_causal_lm
    from lightning_rlhf.stages.common import OptimSpec, build_optimizer

    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), dtype=dtype))
    role = plan(ModelShape.load(str(tiny_model_dir)), Setup(stage="sft", dtype=planned)).roles[0]
    assert role.weights == nbytes(model.parameters())
    opt = build_optimizer(model.parameters(), OptimSpec())
    model(input_ids=torch.tensor([[1, 5, 7, 9]]), labels=torch.tensor([[1, 5, 7, 9]])).loss.backward()
    opt.step()
    assert role.grads == nbytes(p.grad for p in model.parameters())
    state = nbytes(t for s in opt.state.values() for t in s.values() if t.ndim > 0)
    if planned == "fp32":
        assert role.optimizer == state
    else:
        assert role.optimizer == 3 * state  # fp32 master + 2 fp32 moments vs 2 bf16 moments


def test_lora_weights_equal_the_loaded_peft_model(tiny_model_dir):
    """bf16 base plus fp32 adapters (peft upcasts adapters): the planned weight bytes are exact."""
    from lightning_rlhf.models import LoraSpec, ModelSpec, load_causal_lm

    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), dtype="bfloat16", lora=LoraSpec(r=4)))
    role = plan(ModelShape.load(str(tiny_model_dir)), Setup(stage="sft", lora=True, lora_r=4)).roles[0]
    assert role.weights == nbytes(model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert role.trainable == sum(p.numel() for p in trainable) and {p.dtype for p in trainable} == {
        torch.float32
    }
    assert role.grads == nbytes(trainable) and role.optimizer == 2 * nbytes(trainable)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_layer_activations_equal_what_autograd_saves(dtype, kv_heads):
    """The per-layer count (8h + 2h_kv + 4i elements, 10h in 16-bit) against a real Llama: the saved
    bytes of a 3-layer model minus a 1-layer one, halved. Within 2% (small per-row extras such as the
    softmax's log-sum-exp and RoPE's cos/sin)."""
    b, t = 2, 64
    kw = dict(vocab_size=100, hidden_size=128, intermediate_size=352, num_attention_heads=4,
              num_key_value_heads=kv_heads, attn_implementation="sdpa")  # fmt: skip
    ids = torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(0))
    saved = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = (
            AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **kw)).to(dtype).train()
        )
        saved.append(_saved_bytes(model, ids))
    measured = (saved[1] - saved[0]) / 2
    shape = ModelShape.from_config(LlamaConfig(num_hidden_layers=1, **kw).to_dict())
    size = torch.tensor([], dtype=dtype).element_size()
    planned = size * b * t * shape.layer_activation_elems(False, t, half=size == 2)
    assert planned == pytest.approx(measured, rel=0.02)


def test_stage_semantics_which_models_are_held():
    shape = ModelShape.load("llama-2-7b")

    def kinds(**kw):
        return {r.role: r.kind for r in plan(shape, Setup(**kw)).roles}

    assert kinds(stage="sft") == {"policy": "trained"}
    assert kinds(stage="reward") == {"reward model": "trained"}
    assert kinds(stage="ppo") == {"policy": "trained", "reference": "frozen", "critic": "trained",
                                  "reward model": "frozen"}  # fmt: skip
    ppo_lora = kinds(stage="ppo", lora=True, share_backbone=True)
    assert ppo_lora["reference"] == "adapter off (no copy)" and ppo_lora["critic"] == "value head on policy"
    assert (
        kinds(stage="ppo", qlora=True)["critic"] == "trained (QLoRA)"
    )  # the critic copies the policy's settings
    assert "critic" not in kinds(stage="grpo")
    assert kinds(stage="grpo", kl_coef=0)["reference"] == "none (no KL)"
    assert kinds(stage="grpo", reward_model=False)["reward model"] == "none (functions)"
    assert kinds(stage="dpo")["reference"] == "frozen"
    assert kinds(stage="dpo", lora=True)["reference"] == "adapter off (no copy)"
    assert kinds(stage="dpo", precompute_ref=True)["reference"] == "precomputed (freed)"


def test_value_head_is_the_projects_value_head():
    from lightning_rlhf.models.value import ValueHead

    shape = ModelShape.load("llama-2-7b")
    critic = plan(shape, Setup(stage="ppo", share_backbone=True)).roles[2]
    assert critic.trainable == numel(ValueHead(shape.hidden_size))


def test_fsdp_divides_model_state_not_activations():
    shape = ModelShape.load("llama-3-70b")
    one = plan(shape, Setup(stage="ppo", gpus=8))  # DDP: every GPU holds everything
    sharded = plan(shape, Setup(stage="ppo", gpus=8, fsdp=True))
    for a, b in zip(one.roles, sharded.roles, strict=True):
        assert (b.weights, b.grads, b.optimizer) == pytest.approx(
            (a.weights / 8, a.grads / 8, a.optimizer / 8)
        )
        assert b.activations == a.activations
    assert one.fsdp_buffers == 0 < sharded.fsdp_buffers
    # full 70B: 16 bytes per trained parameter; the trained policy alone is 16 * 70.55e9 / 8 bytes per GPU
    assert (
        sharded.roles[0].weights + sharded.roles[0].grads + sharded.roles[0].optimizer
        == 16 * 70_553_706_496 / 8
    )


def test_qlora_base_is_nf4_plus_fp32_unquantised_parts():
    shape = ModelShape.load("llama-2-7b")
    role = plan(shape, Setup(stage="sft", qlora=True, lora_r=8)).roles[0]
    quantized = 32 * 4096 * (4 * 4096 + 3 * 11008)  # the decoder's linear weights
    rest = 6_738_415_616 - quantized  # embeddings, norms, LM head: fp32 after prepare_model_for_kbit_training
    assert role.weights == pytest.approx(quantized * NF4_BYTES + rest * 4 + role.trainable * 4)
    assert NF4_BYTES == pytest.approx(0.5 + 0.0159, abs=1e-4)


def test_gradient_checkpointing_keeps_one_hidden_state_per_layer():
    shape = ModelShape.load("llama-2-7b")
    full = plan(shape, Setup(stage="sft", batch=2, seq=1024)).roles[0].activations
    ckpt = (
        plan(shape, Setup(stage="sft", batch=2, seq=1024, gradient_checkpointing=True)).roles[0].activations
    )
    logits = 2 * 2 * 2048 * 32000
    per_layer = 2 * 2048 * (10 * 4096 + 2 * 4096 + 4 * 11008)
    assert full == 32 * per_layer + logits
    assert ckpt == 32 * 2 * 2048 * 4096 + per_layer + logits


def test_cli_prints_the_table_and_json(capsys, tiny_model_dir):
    cli(["plan-memory", "--model", "llama-2-7b", "--stage", "ppo", "--lora", "--gpus", "8", "--fsdp"])
    out = capsys.readouterr().out
    for word in ("policy", "reference", "critic", "reward model", "adapter off", "FSDP2", "fits in 80 GiB"):
        assert word in out
    cli(["plan-memory", "--model", str(tiny_model_dir), "--stage", "dpo", "--dtype", "fp32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert [r["role"] for r in data["roles"]] == ["policy", "reference"]
    assert data["total"] < GiB and data["fits"]


def test_cli_rejects_a_bad_model_with_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["plan-memory", "--model", str(tmp_path / "nope"), "--stage", "sft"])
    assert "nope" in str(e.value.code) and "preset" in str(e.value.code)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SystemExit) as e:
        cli(["plan-memory", "--model", str(tmp_path), "--stage", "sft"])
    assert "config.json" in str(e.value.code) and "vocab_size" in str(e.value.code)
    with pytest.raises(PlanError, match="stage"):
        Setup(stage="rlhf")


def test_readme_shows_the_planners_current_table():
    from pathlib import Path

    from lightning_rlhf.memory import readme_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme, "README's planner table is stale: python -m lightning_rlhf.memory"
