"""Dropout is off by default in the online stages and DPO (as TRL), tested on a dropout-0.1 GPT-2."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec, disable_dropout, load_causal_lm
from lightning_rlhf.stages import DPOModule, GenerationSpec, PPOModule
from lightning_rlhf.stages.common import OptimSpec


def great(prompts, completions, **_):
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


GREAT = f"{__name__}.great"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, demo_tokenizer):
    """A tiny random GPT-2 with GPT-2's own dropout (0.1 on embeddings, attention, residuals)."""
    tok = demo_tokenizer
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1
    out = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompts(prompt_file, tokenizer) -> dict:
    dm = RLHFDataModule(str(prompt_file), kind="prompt", tokenizer=tokenizer, batch_size=4, shuffle=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def train_forward_twice(model, ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


def test_disable_dropout_makes_train_mode_deterministic(gpt2_dir, demo_tokenizer):
    ids = torch.tensor([demo_tokenizer("the phone is great .")["input_ids"]])
    model = load_causal_lm(str(gpt2_dir), trainable=False)
    a, b = train_forward_twice(model, ids)
    assert not torch.equal(a, b)  # GPT-2's dropout is on in train mode
    disable_dropout(model)
    a, b = train_forward_twice(model, ids)
    assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, a)  # train mode == eval mode
    assert model.config.resid_pdrop == 0.1  # the exported config keeps the model's dropout


def test_disable_dropout_zeroes_float_attention_rates():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        attention_dropout=0.3,
    ))  # fmt: skip
    assert model.model.layers[0].self_attn.attention_dropout == 0.3  # a float, no nn.Dropout module
    disable_dropout(model)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("disable", [True, False], ids=["dropout-off", "dropout-on"])
def test_first_ppo_ratio_is_exactly_one(gpt2_dir, demo_tokenizer, prompt_file, disable, lora):
    """The old log-probs (eval mode, no grad) and the first training forward (train mode) of the same
    rollout are the same numbers: ratio exactly 1. With dropout on they are not."""
    spec = ModelSpec(str(gpt2_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.1) if lora else None)
    m = PPOModule(spec, reward_functions=[GREAT], critic_init="policy", generation=GenerationSpec(max_new_tokens=6),
                  disable_dropout=disable)  # fmt: skip
    m.configure_model()
    rollout = m.generate(prompts(prompt_file, demo_tokenizer))
    old = m.policy_logprobs(rollout)  # (N, R)
    m.policy.train()
    new = rollout.response_logprobs(m.policy)[0]  # the training forward
    mask = rollout.response_mask.bool()
    ratio = (new - old).exp()[mask]
    critic_rates = {mod.p for mod in m.critic.modules() if isinstance(mod, torch.nn.Dropout)}
    if disable:
        assert torch.equal(ratio, torch.ones_like(ratio))
        assert critic_rates == {0.0}  # the critic (a GPT-2 classifier) has no dropout either
    else:
        assert not torch.equal(ratio, torch.ones_like(ratio))
        assert 0.1 in critic_rates


def test_ppo_first_step_has_zero_approx_kl_and_clipfrac(gpt2_dir, prompt_file):
    """Under a Trainer: one epoch, one mini-batch, so the ratio is measured before any update."""
    m = PPOModule(str(gpt2_dir), reward_functions=[GREAT], critic_init="policy", kl_coef=0.0,
                  generation=GenerationSpec(max_new_tokens=6), ppo_epochs=1, log_samples_every_n_steps=0,
                  optim=OptimSpec(learning_rate=1e-3))  # fmt: skip
    t = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    t.fit(m, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    assert float(t.callback_metrics["train/clipfrac"]) == 0.0
    assert abs(float(t.callback_metrics["train/approx_kl"])) < 1e-6


@pytest.mark.parametrize("disable", [True, False], ids=["dropout-off", "dropout-on"])
def test_dpo_log_ratios_are_deterministic(gpt2_dir, tmp_path, write_jsonl, disable):
    pairs = [{"prompt": "review the phone .", "chosen": " the phone is great .", "rejected": " it is bad ."}] * 2
    m = DPOModule(str(gpt2_dir), disable_dropout=disable)
    m.configure_model()
    dm = RLHFDataModule(str(write_jsonl(tmp_path / "p.jsonl", pairs)), kind="preference", tokenizer=m.tokenizer,
                        batch_size=2, max_length=32, max_prompt_length=16, shuffle=False)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    m.policy.train()
    with torch.no_grad():
        runs = [m.completion_logps(m.policy, batch)[0] - m.reference_logps(batch) for _ in range(2)]
    if disable:
        assert torch.equal(runs[0], runs[1])
        assert torch.equal(runs[0], torch.zeros_like(runs[0]))  # policy == reference at the start
    else:
        assert not torch.equal(runs[0], runs[1])
