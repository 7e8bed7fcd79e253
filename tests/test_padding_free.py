"""padding_free forwards: packed rows give the padded rows' log-probs, entropies, values and gradients.

Rollout layout (left-padded prompts of different lengths, right-padded responses, some cut short by
EOS), three families (Llama: rotary; GPT-2 and OPT: learned absolute positions, OPT with an offset),
sdpa and eager attention, fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, V, build, ragged_rollout
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_rlhf.models.forward import four_d_mask_refusal, sequence_logprobs
from lightning_rlhf.models.value import ValueHead, logprobs_and_values, sequence_values
from lightning_rlhf.rollout.generate import Rollout


def rollout(seed: int = 0) -> Rollout:
    """6 rows: ragged prompts (1..5 tokens, left-padded to 5), responses of 1..8 tokens (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (5, 1, 3, 2, 5, 4)]
    return ragged_rollout(prompts, [8, 2, 8, 1, 3, 6], list(range(6)), g)


def grads(model) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_response_logprobs_and_gradients_equal_padded(family, attn):
    model = build(family, attn)
    ro = rollout()
    mask = ro.response_mask.bool()
    weights = torch.randn(ro.response_ids.shape, generator=torch.Generator().manual_seed(3))
    out = {}
    for padding_free in (False, True):
        lp, ent = ro.response_logprobs(model, 0.7, return_entropy=True, padding_free=padding_free)
        ((lp * weights).sum() + ent.sum()).backward()
        out[padding_free] = (lp.detach(), ent.detach(), grads(model))
    (lp0, ent0, g0), (lp1, ent1, g1) = out[False], out[True]
    assert lp0.shape == lp1.shape == ro.response_ids.shape
    torch.testing.assert_close(lp1[mask], lp0[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1[mask], ent0[mask], atol=1e-5, rtol=0)
    assert bool((lp1[~mask] == 0).all())
    assert_same_grads(g0, g1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_full_sequence_logprobs_equal_padded(family):
    """Without logits_to_keep: every label that follows a real token (prompts too)."""
    model = build(family, "sdpa")
    ids, attn, pos = rollout(1).sequences()
    with torch.no_grad():
        lp0, _ = sequence_logprobs(model, ids, attn, pos)
        lp1, _ = sequence_logprobs(model, ids, attn, pos, padding_free=True)
    both = attn[:, 1:].bool() & attn[:, :-1].bool()
    torch.testing.assert_close(lp1[both], lp0[both], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_packed_critic_values_and_gradients_equal_padded(family, attn):
    critic = build(family, attn, classifier=True, seed=1)
    ro = rollout(2)
    mask = ro.response_mask.bool()
    r = ro.response_ids.shape[1]
    out = {}
    for padding_free in (False, True):
        values = sequence_values(critic, *ro.sequences(), values_to_keep=r, padding_free=padding_free)
        (values * mask).pow(2).sum().backward()
        out[padding_free] = (values.detach(), grads(critic))
    torch.testing.assert_close(out[True][0][mask], out[False][0][mask], atol=1e-5, rtol=0)
    assert_same_grads(out[False][1], out[True][1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_shared_backbone_values_equal_padded(family):
    policy = build(family, "sdpa")
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight)  # non-zero, so the values carry the hidden states
    ro = rollout(3)
    mask = ro.response_mask.bool()
    r = ro.response_ids.shape[1]
    out = {}
    for padding_free in (False, True):
        lp, ent, values = logprobs_and_values(
            policy, head, *ro.sequences(), return_entropy=True, logits_to_keep=r, padding_free=padding_free
        )
        ((lp + values) * mask).sum().backward()
        out[padding_free] = (lp.detach(), values.detach(), {**grads(policy), **grads(head)})
    for j in (0, 1):
        torch.testing.assert_close(out[True][j][mask], out[False][j][mask], atol=1e-5, rtol=0)
    assert_same_grads(out[False][2], out[True][2])


def test_packed_lora_logprobs_and_gradients_equal_padded():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama", "sdpa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # B is zero-initialised: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ro = rollout(4)
    mask = ro.response_mask.bool()
    out = {}
    for padding_free in (False, True):
        lp, _ = ro.response_logprobs(model, padding_free=padding_free)
        lp.sum().backward()
        out[padding_free] = (lp.detach(), grads(model))
    torch.testing.assert_close(out[True][0][mask], out[False][0][mask], atol=1e-5, rtol=0)
    assert_same_grads(out[False][1], out[True][1])
    assert all("lora" in k for k in out[True][1])


def test_packing_uses_fewer_rows_and_tokens():
    """What the option saves on this rollout: 6 rows of 13 columns -> fewer rows of <= 13."""
    from lightning_rlhf.core.packing import pack_rows

    ids, attn, pos = rollout().sequences()
    packing = pack_rows(ids, attn, position_ids=pos)
    assert packing.input_ids.numel() < ids.numel()
    assert packing.input_ids.shape[1] <= ids.shape[1]


def test_sliding_window_shorter_than_a_packed_row_runs_padded_with_a_warning():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "mistral", vocab_size=V, pad_token_id=0, **FAMILIES["llama"], sliding_window=4
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ro = rollout()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="sliding window"):
            lp1, _ = ro.response_logprobs(model, padding_free=True)
        lp0, _ = ro.response_logprobs(model)
    assert torch.equal(lp0, lp1)


def test_attention_without_4d_masks_is_named():
    model = build("llama", "sdpa")
    assert four_d_mask_refusal(model) is None
    model.config._attn_implementation = "flash_attention_2"
    reason = four_d_mask_refusal(model)
    assert "flash_attention_2" in reason and "sdpa" in reason


def test_rows_that_do_not_pack_run_padded():
    """Every row as long as the longest: no packed row could hold two, so the padded forward runs."""
    from lightning_rlhf.models.forward import packed_forward

    model = build("llama", "sdpa")
    ids = torch.randint(1, V, (3, 6))
    mask = torch.ones_like(ids)
    assert packed_forward(model, ids, mask) is None
    mask[1:, 3:] = 0  # two rows of 3 fit in one row of 6
    packing, kwargs = packed_forward(model, ids, mask)
    assert kwargs["input_ids"].shape == (2, 6) and kwargs["attention_mask"].shape == (2, 1, 6, 6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_reward_model_scores_equal_padded(family, attn):
    from lightning_rlhf.rollout.scoring import RewardModelScorer

    rm = build(family, attn, classifier=True, seed=2)
    ro = rollout(5)
    with torch.no_grad():
        padded, _ = RewardModelScorer(rm)(ro)
        packed, _ = RewardModelScorer(rm, padding_free=True)(ro)
        ids, mask, pos = ro.sequences()
        assert rm.config.pad_token_id is not None
        from lightning_rlhf.models.forward import packed_forward

        assert packed_forward(rm, ids, mask, pos) is not None  # the packed path is taken
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
