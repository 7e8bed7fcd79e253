"""share_prompt: DPO log-probs and reward-model scores from one ``[prompt, chosen, rejected]`` row per
pair equal those of the separate rows (fp32, ragged prompts and completions, padding), with sdpa and
eager attention and on other model families; and a short training run gives the same losses."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec
from lightning_rlhf.models.forward import shared_prompt_mask
from lightning_rlhf.stages import DPOModule, RewardModule
from lightning_rlhf.stages.common import OptimSpec

ATOL = 1e-5  # fp32: the same sums in another order (summed log-probs of ~10 tokens are ~ -50)


def _msg(role, text):
    return [{"role": role, "content": text}]


RECORDS = [  # prompts, chosen and rejected all of different lengths: every row of a batch is padded
    ("review the phone .", "the phone is great .", "the phone is bad . it broke ."),
    ("review the lamp please . it is new .", "i love this lamp . it works well .", "bad ."),
    ("hi .", "the chair is very lovely .", "it broke fast . the chair is awful ."),
    ("review the bag .", "good .", "the bag is poor . i hate it ."),
]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory, write_jsonl):
    recs = [{"prompt": _msg("user", p), "chosen": _msg("assistant", c), "rejected": _msg("assistant", r)}
            for p, c, r in RECORDS]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("share") / "pairs.jsonl", recs)


def batch_of(tokenizer, pref_file) -> dict:
    dm = RLHFDataModule(str(pref_file), kind="preference", tokenizer=tokenizer, batch_size=4, shuffle=False,
                        max_length=64, max_prompt_length=32)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2  # ragged: padding in the separate layout
    return batch


def dpo(model_dir, share: bool, lora: bool = False, attn: str | None = None) -> DPOModule:
    spec = ModelSpec(path=str(model_dir), lora=LoraSpec(r=4, alpha=8) if lora else None, attn_implementation=attn)
    module = DPOModule(spec, optim=OptimSpec(learning_rate=1e-2, scheduler="constant"), share_prompt=share)
    module.configure_model()
    return module


def perturb(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dpo_logps_equal_separate_rows(tiny_model_dir, pref_file, attn):
    shared, apart = dpo(tiny_model_dir, True, attn=attn), dpo(tiny_model_dir, False, attn=attn)
    perturb(shared.policy)
    apart.policy.load_state_dict(shared.policy.state_dict())
    assert shared_prompt_mask(shared.policy, torch.ones(1, 1, 4, 4, dtype=torch.bool)) is not None  # path taken
    batch = batch_of(shared.tokenizer, pref_file)
    s_sums, s_counts = shared.completion_logps(shared.policy, batch)
    a_sums, a_counts = apart.completion_logps(apart.policy, batch)
    assert torch.equal(s_counts, a_counts)
    torch.testing.assert_close(s_sums, a_sums, atol=ATOL, rtol=0)
    torch.testing.assert_close(shared.reference_logps(batch), apart.reference_logps(batch), atol=ATOL, rtol=0)
    # gradients too: the policy's parameter gradients of the summed log-probs agree
    s_sums.sum().backward()
    a_sums.sum().backward()
    for (name, p), q in zip(shared.policy.named_parameters(), apart.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_dpo_lora_reference_by_disabled_adapter_equal_separate_rows(tiny_model_dir, pref_file):
    shared, apart = dpo(tiny_model_dir, True, lora=True), dpo(tiny_model_dir, False, lora=True)
    apart.policy.load_state_dict(shared.policy.state_dict())
    batch = batch_of(shared.tokenizer, pref_file)
    torch.testing.assert_close(shared.reference_logps(batch), apart.reference_logps(batch), atol=ATOL, rtol=0)


def test_short_dpo_run_gives_the_same_losses(tiny_model_dir, pref_file):
    shared, apart = dpo(tiny_model_dir, True), dpo(tiny_model_dir, False)
    batch = batch_of(shared.tokenizer, pref_file)
    losses = {}
    for name, m in (("shared", shared), ("apart", apart)):
        opt = torch.optim.AdamW(m.policy.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss, _ = m._loss(batch, "train")
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["shared"][-1] < losses["shared"][0] - 0.05  # it trains
    assert losses["shared"] == pytest.approx(losses["apart"], abs=1e-4)


def rm(model_dir, share: bool, attn: str | None = None) -> RewardModule:
    module = RewardModule(ModelSpec(path=str(model_dir), attn_implementation=attn),
                          optim=OptimSpec(learning_rate=1e-2, scheduler="constant"), share_prompt=share)  # fmt: skip
    module.configure_model()
    return module


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reward_scores_and_short_run_equal_separate_rows(rm_dir, pref_file, attn):
    shared, apart = rm(rm_dir, True, attn), rm(rm_dir, False, attn)
    perturb(shared.model)
    apart.model.load_state_dict(shared.model.state_dict())
    batch = batch_of(shared.tokenizer, pref_file)
    for s, a in zip(shared(batch), apart(batch), strict=True):
        torch.testing.assert_close(s, a, atol=ATOL, rtol=0)
    losses = {}
    for name, m in (("shared", shared), ("apart", apart)):
        opt = torch.optim.AdamW(m.model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss, _, _ = m._step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["shared"][-1] < losses["shared"][0]  # it trains
    assert losses["shared"] == pytest.approx(losses["apart"], abs=1e-5)


FAMILIES = {  # learned absolute positions (gpt2, opt), fused qkv (gpt_neox), q/k/v biases (qwen2)
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=128),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     rotary_pct=0.5, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_give_the_same_logps(family, demo_tokenizer, pref_file, tmp_path):
    tok = demo_tokenizer
    config = AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    shared = dpo(tmp_path, True)
    apart = copy.copy(shared)
    apart.share_prompt = False
    batch = batch_of(shared.tokenizer, pref_file)
    assert shared_prompt_mask(shared.policy, torch.ones(1, 1, 4, 4, dtype=torch.bool)) is not None
    shared.policy.eval()
    torch.testing.assert_close(shared.completion_logps(shared.policy, batch)[0],
                               apart.completion_logps(shared.policy, batch)[0], atol=ATOL, rtol=0)  # fmt: skip


def test_sliding_window_shorter_than_the_row_falls_back(tiny_model_dir):
    module = dpo(tiny_model_dir, True)
    allowed = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert shared_prompt_mask(module.policy, allowed) is allowed
    module.policy.config.sliding_window = 4
    assert shared_prompt_mask(module.policy, allowed) is None
    module.policy.config.sliding_window = None
    module.policy.config._attn_implementation = "flash_attention_2"
    assert shared_prompt_mask(module.policy, allowed) is None
