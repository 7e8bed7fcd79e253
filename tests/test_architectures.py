"""Any Hugging Face causal LM: every stage on tiny random models of six families besides Llama.

Each family stresses something the tiny Llama does not:

- ``gpt2``: ``Conv1D`` projections (transposed weights: LoRA's ``fan_in_fan_out``), learned absolute
  positions, dropout 0.1 everywhere.
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``.
- ``gpt_neox``: fused ``query_key_value``, partial rotary, parallel residual.
- ``qwen2``: biases on the q/k/v projections.
- ``gemma2``: final-logit and attention soft-capping, scaled embeddings, sliding-window layers
  (eager attention, as transformers recommends for soft-capping).
- ``opt``: learned positions with an offset of 2, a separate ``word_embed_proj_dim``.

All share one word-level tokenizer (the demo's vocabulary) with a BOS token that the chat template
writes, and ``pad == eos``, the two tokenizer traits most real checkpoints have and the demo's lacks.
"""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import (
    LoraSpec,
    ModelSpec,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from lightning_rlhf.models.distributed import fsdp_units
from lightning_rlhf.models.forward import sequence_logprobs
from lightning_rlhf.models.value import ValueHead, hidden_size, logprobs_and_values, sequence_values
from lightning_rlhf.rollout.scoring import last_token_scores
from lightning_rlhf.stages import DPOModule, GenerationSpec, GRPOModule, PPOModule, RewardModule, SFTModule
from lightning_rlhf.stages.common import OptimSpec

BOS = "<s>"
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "phi3": dict(SIZE, intermediate_size=64, num_key_value_heads=2),
    "gpt_neox": dict(SIZE, intermediate_size=64, rotary_pct=0.5),
    "qwen2": dict(SIZE, intermediate_size=64, num_key_value_heads=2),
    "gemma2": dict(SIZE, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=16,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, attn_implementation="eager"),
    "opt": dict(SIZE, ffn_dim=64, word_embed_proj_dim=32),
}  # fmt: skip


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


GREAT = f"{__name__}.great"


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory, demo_dir):
    """The demo's word-level tokenizer plus a BOS token, pad == eos, a chat template that writes BOS."""
    out = tmp_path_factory.mktemp("bos-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / f, out / f)
    tj = json.loads((out / "tokenizer.json").read_text())
    bos_id = len(tj["model"]["vocab"])
    tj["model"]["vocab"][BOS] = bos_id
    tj["added_tokens"].append(
        {"id": bos_id, "content": BOS, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    )  # fmt: skip
    tj["post_processor"] = {  # plain text gets BOS from the tokenizer (chat text from the template)
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
    }  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.update(bos_token=BOS, pad_token="</s>")
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


@pytest.fixture(scope="module")
def tokenizer(bos_tokenizer_dir):
    return load_tokenizer(bos_tokenizer_dir)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, bos_tokenizer_dir, tokenizer):
    """``(name, causal LM folder, one-label classifier folder)`` of a tiny random model of the family."""
    name = request.param
    kw = dict(FAMILIES[name])
    attn = kw.pop("attn_implementation", None)
    config = AutoConfig.for_model(
        name, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **kw,
    )  # fmt: skip
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(0)
    lm_dir = tmp_path_factory.mktemp(f"{name}-lm")
    AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
    rm_dir = tmp_path_factory.mktemp(f"{name}-rm")
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    for d in (lm_dir, rm_dir):
        for f in bos_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
    return name, lm_dir, rm_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_jsonl, memo_records):
    d = tmp_path_factory.mktemp("arch-data")
    pairs = [
        {"prompt": [{"role": "user", "content": r["prompt"][0]["content"]}],
         "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "the phone is bad ."}]}
        for r in memo_records
    ]  # fmt: skip
    return {
        "sft": write_jsonl(d / "sft.jsonl", memo_records),
        "pref": write_jsonl(d / "pref.jsonl", pairs),
        "prompt": write_jsonl(d / "prompt.jsonl", [{"prompt": r["prompt"]} for r in memo_records[:4]]),
    }


LORA = LoraSpec(r=4, alpha=8, target_modules="all-linear")


def spec(path) -> ModelSpec:
    return ModelSpec(str(path), lora=LORA)


def fit(module, kind: str, file, **kw):
    kw.setdefault("max_steps", 2)
    dm = RLHFDataModule(str(file), kind=kind, batch_size=2, max_length=48, max_prompt_length=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kw)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


def lora_b_moved(model) -> None:
    """LoRA's B matrices start at 0: after training every one has moved (every adapted layer learned)."""
    bs = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert bs, "no LoRA layers: all-linear matched nothing"
    still = [n for n, p in bs.items() if not p.detach().abs().sum() > 0]
    assert not still, f"LoRA B unchanged: {still[:5]}"


# ------------------------------------------------------------------------------ the tokenizer


def test_tokenizer_has_bos_pad_equals_eos_and_the_template_writes_bos_once(tokenizer):
    assert tokenizer.bos_token == BOS and tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_completion_only_loss_masks_exactly_the_assistant_tokens(tokenizer, files, memo_records):
    """pad == eos: the completion's closing EOS is still trained on, the padding after it is not."""
    dm = RLHFDataModule(str(files["sft"]), kind="sft", tokenizer=tokenizer, batch_size=8, max_length=48, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for row, rec in enumerate(memo_records):
        ids = batch["input_ids"][row][batch["loss_mask"][row].bool()].tolist()
        want = tokenizer(rec["completion"][0]["content"] + " " + tokenizer.eos_token, add_special_tokens=False)
        assert ids == want["input_ids"], (tokenizer.decode(ids), rec["completion"][0]["content"])
        n_real = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, 0] == tokenizer.bos_token_id
        assert not batch["loss_mask"][row, n_real:].any()


# ------------------------------------------------------------------------------ per family


def test_heads_logprobs_values_and_fsdp_units(family, tokenizer):
    name, lm_dir, rm_dir = family
    policy = load_causal_lm(spec(lm_dir)).eval()  # eval: GPT-2's dropout would make two forwards differ
    ids = torch.tensor([tokenizer("the phone is great .")["input_ids"]])
    mask = torch.ones_like(ids)
    logprobs, _ = sequence_logprobs(policy, ids, mask)
    # the shared-backbone value head reads the backbone's last hidden state, aligned with the log-probs
    head = ValueHead(hidden_size(policy))
    lp, _, values = logprobs_and_values(policy, head, ids, mask)
    torch.testing.assert_close(lp, logprobs)
    assert values.shape == logprobs.shape == (1, ids.shape[1] - 1)
    # the separate critic and the reward model: a one-label classifier, from the LM folder (new head)
    # and from a saved classifier
    for folder in (lm_dir, rm_dir):
        critic = load_sequence_classifier(spec(folder))
        v = sequence_values(critic, ids, mask)
        assert v.shape == (1, ids.shape[1] - 1) and torch.isfinite(v).all()
        s = last_token_scores(critic, ids, mask)
        assert s.shape == (1,)
    # FSDP2 units: one per decoder layer, from the model's `_no_split_modules`
    units = fsdp_units(policy)
    assert len(units) == 2, [type(u).__name__ for u in units]


@pytest.mark.slow
def test_every_stage_trains_with_lora_all_linear(family, files, tmp_path):
    name, lm_dir, rm_dir = family
    optim = OptimSpec(learning_rate=1e-2, scheduler="constant")
    sft = SFTModule(spec(lm_dir), optim=optim)
    t = fit(sft, "sft", files["sft"])
    assert torch.isfinite(t.callback_metrics["train/loss"])
    lora_b_moved(sft.policy)
    # the export merges LoRA into the base (Conv1D's transposed weights, fused qkv): same logits
    out = sft.save_pretrained(tmp_path / "sft")
    ids = torch.tensor([[sft.tokenizer.bos_token_id, 10, 11, 12]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, sft.policy.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip

    rm = RewardModule(spec(rm_dir), optim=optim)
    fit(rm, "preference", files["pref"])
    lora_b_moved(rm.model)

    dpo = DPOModule(spec(lm_dir), optim=optim)
    fit(dpo, "preference", files["pref"])
    assert dpo.reference is None  # the disabled adapter is the reference
    lora_b_moved(dpo.policy)

    gen = GenerationSpec(max_new_tokens=4)
    ppo = PPOModule(spec(lm_dir), reward_model=str(rm_dir), generation=gen, ppo_epochs=1, optim=optim,
                    critic_optim=optim, log_samples_every_n_steps=0)  # fmt: skip
    t = fit(ppo, "prompt", files["prompt"], max_steps=-1, max_epochs=1, limit_train_batches=1)
    assert float(t.callback_metrics["train/clipfrac"]) == 0.0  # one epoch, one mini-batch: ratio 1
    lora_b_moved(ppo.policy)

    grpo = GRPOModule(spec(lm_dir), reward_functions=[GREAT], num_generations=2, generation=gen, optim=optim,
                      log_samples_every_n_steps=0)  # fmt: skip
    t = fit(grpo, "prompt", files["prompt"], max_steps=-1, max_epochs=1, limit_train_batches=1)
    assert "rollout/reward_mean" in t.callback_metrics
