"""generate(): KV-cache sampling against a full-forward reference, masks, EOS, padding, LoRA, bf16."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.rollout import Rollout, filter_logits, generate, left_pad, sample_next

PAD, EOS = 0, 1


def tiny_llama(seed: int = 0, pad_token_id: int = PAD, eos_token_id: int = EOS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def ragged_prompts(lengths=(3, 7, 5), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(B, max(lengths))` prompts of tokens >= 3 (never pad/eos/bos)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


@torch.no_grad()
def reference_generate(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_k, top_p,
                       num_samples, eos_ids, generator):
    """No cache, no left padding: each row kept as a python list, the batch re-padded on the right
    and run through a full forward every step; the next-token logits read at each row's last token."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)]
    rows = [list(r) for r in rows for _ in range(num_samples)]
    start = [len(r) for r in rows]
    done = [False] * len(rows)
    logprobs = [[] for _ in rows]
    for _ in range(max_new_tokens):
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=ids, attention_mask=mask).logits  # default arange positions: right padding
        last = logits[torch.arange(len(rows)), mask.sum(-1) - 1]  # (N, V)
        tok, lp = sample_next(last, temperature, top_k, top_p, generator)
        for i in range(len(rows)):
            if not done[i]:
                rows[i].append(int(tok[i]))
                logprobs[i].append(float(lp[i]))
                done[i] = int(tok[i]) in eos_ids
        if all(done):
            break
    responses = [r[s:] for r, s in zip(rows, start, strict=True)]
    return responses, logprobs, done


def rollout_rows(r: Rollout) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(r.response_ids, r.response_mask, strict=True)]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 12, 0.9), (0.0, 0, 1.0)], ids=["plain", "topk_topp", "greedy"]
)
def test_kv_cache_matches_full_forward_reference(temperature, top_k, top_p):
    model = tiny_llama()
    ids, mask = ragged_prompts()
    eos_ids = [EOS, 5, 6, 7]  # several stop ids so that some rows stop early and others don't
    kw = dict(max_new_tokens=14, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=3)
    r = generate(model, ids, mask, eos_token_id=eos_ids, pad_token_id=PAD, generator=torch.Generator().manual_seed(3),
                 **kw)
    ref_tokens, ref_logprobs, ref_done = reference_generate(
        model, ids, mask, eos_ids=eos_ids, generator=torch.Generator().manual_seed(3), **kw
    )
    assert rollout_rows(r) == ref_tokens
    assert r.finished.tolist() == ref_done
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for row, (lp, m) in enumerate(zip(r.logprobs, r.response_mask, strict=True)):
        torch.testing.assert_close(lp[m.bool()], torch.tensor(ref_logprobs[row]), atol=1e-5, rtol=0)
    if temperature > 0:  # the sampled cases exercise both a stopped and a cut row
        assert r.finished.any() and not r.finished.all()


def test_recorded_logprobs_equal_training_forward_at_temperature():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    r = generate(model, ids, mask, max_new_tokens=10, temperature=0.6, top_k=8, num_samples=2, eos_token_id=EOS,
                 pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    logprobs, entropy = r.response_logprobs(model, temperature=0.6, return_entropy=True)
    assert logprobs.shape == entropy.shape == r.response_ids.shape
    assert logprobs.dtype == torch.float32 and r.logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, r.logprobs, atol=1e-5, rtol=0)
    off = r.response_mask == 0
    assert (logprobs[off] == 0).all() and (entropy[off] == 0).all() and (entropy[~off] > 0).all()
    # a different temperature gives different log-probs: the temperature is really applied
    assert not torch.allclose(r.response_logprobs(model, temperature=1.0)[0], r.logprobs, atol=1e-3)


def test_rollout_is_a_constant_usable_in_training():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    r = generate(model, ids, mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert not r.logprobs.requires_grad
    logprobs, _ = r.response_logprobs(model)
    ratio = (logprobs - r.logprobs).exp()  # no "inference tensor" error: generate uses no_grad
    (ratio * r.response_mask).sum().backward()
    assert model.lm_head.weight.grad is not None


def test_eos_stops_rows_and_pads_after_with_pad_equal_to_eos():
    model = tiny_llama(pad_token_id=EOS, eos_token_id=EOS)
    ids, mask = ragged_prompts()
    ids = ids.masked_fill(mask == 0, EOS)
    eos_ids = [EOS, 9, 10, 11, 12]
    r = generate(model, ids, mask, max_new_tokens=20, num_samples=4, eos_token_id=eos_ids, pad_token_id=EOS,
                 generator=torch.Generator().manual_seed(0))
    for toks, m, fin in zip(r.response_ids.tolist(), r.response_mask.tolist(), r.finished.tolist(), strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)  # mask: a block of ones, then zeros
        assert toks[n:] == [EOS] * (len(m) - n)  # pad after the row stopped
        stops = [i for i, t in enumerate(toks[:n]) if t in eos_ids]
        assert fin == bool(stops)
        assert stops == ([n - 1] if fin else [])  # a finished row ends on its only EOS; an open one is cut
        if not fin:
            assert n == 20
    assert r.finished.any() and not r.finished.all()
    assert (r.logprobs[r.response_mask == 0] == 0).all()
    # prompts: pads (= eos) are masked out, the training forward still reproduces the log-probs
    torch.testing.assert_close(r.response_logprobs(model)[0], r.logprobs, atol=1e-5, rtol=0)


def test_loop_stops_when_every_row_is_done():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    r = generate(model, ids, mask, max_new_tokens=16, eos_token_id=list(range(64)), pad_token_id=PAD)
    assert r.response_ids.shape == (3, 1)
    assert r.finished.all() and r.response_mask.all()


def test_greedy_is_deterministic_and_top_k1_top_p_tiny_equal_greedy():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    greedy = generate(model, ids, mask, temperature=0.0, **kw)
    again = generate(model, ids, mask, temperature=0.0, generator=torch.Generator().manual_seed(9), **kw)
    top_k1 = generate(model, ids, mask, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(1), **kw)
    top_p0 = generate(model, ids, mask, temperature=0.9, top_p=1e-6, generator=torch.Generator().manual_seed(2), **kw)
    for other in (again, top_k1, top_p0):
        assert torch.equal(other.response_ids, greedy.response_ids)
    # greedy records log-probs at temperature 1
    torch.testing.assert_close(greedy.response_logprobs(model, temperature=1.0)[0], greedy.logprobs, atol=1e-5, rtol=0)


def test_first_token_distribution_does_not_depend_on_batch_padding():
    model = tiny_llama()
    ids, mask = ragged_prompts(lengths=(3, 9, 6))
    captured = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out[:, -1].clone()))
    try:
        generate(model, ids, mask, max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD)
        batched = captured[0]  # (3, V) prefill logits
        for row in range(3):
            captured.clear()
            generate(model, ids[row : row + 1, : mask[row].sum()], mask[row : row + 1, : mask[row].sum()],
                     max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD)
            torch.testing.assert_close(batched[row], captured[0][0], atol=1e-5, rtol=0)
    finally:
        hook.remove()
    # and later tokens too: greedy continuation of the shortest prompt, alone vs batched
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    alone = generate(model, ids[:1, :3], mask[:1, :3], **kw)
    batch = generate(model, ids, mask, **kw)
    assert rollout_rows(batch)[0] == rollout_rows(alone)[0]
    torch.testing.assert_close(batch.logprobs[0, : alone.logprobs.shape[1]], alone.logprobs[0], atol=1e-5, rtol=0)


def test_left_pad_handles_any_padding_layout():
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 9], [3, 0, 4, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    left, left_mask = left_pad(ids, mask, pad_token_id=0)
    assert left.tolist() == [[0, 5, 6], [7, 8, 9], [0, 3, 4]]
    assert left_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert filter_logits(logits, top_k=1).isfinite().tolist() == [[True, False, False, False]]
    # ties at the k-th value are kept (as transformers' TopKLogitsWarper)
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[True, True, True, False]]
    # nucleus: 0.5 < 0.6, 0.5 + 0.2 >= 0.6 -> two tokens
    assert filter_logits(logits, top_p=0.6).isfinite().sum().item() == 2
    assert filter_logits(logits, top_p=0.5).isfinite().sum().item() == 1
    assert filter_logits(logits, top_p=0.95).isfinite().sum().item() == 4


def test_model_modes_restored_after_generate():
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately in eval mode stays so
    ids, mask = ragged_prompts()
    generate(model, ids, mask, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    model.eval()
    generate(model, ids, mask, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    assert not any(m.training for m in model.modules())


def test_lora_wrapped_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    ids, mask = ragged_prompts()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    r = generate(model, ids, mask, max_new_tokens=6, temperature=0.8, num_samples=2, eos_token_id=EOS,
                 pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert model.training
    logprobs, _ = r.response_logprobs(model, temperature=0.8)
    torch.testing.assert_close(logprobs, r.logprobs, atol=1e-5, rtol=0)
    logprobs.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with model.disable_adapter():  # the adapter changes the policy
        base_logprobs, _ = r.response_logprobs(model, temperature=0.8)
    assert not torch.allclose(base_logprobs, r.logprobs, atol=1e-3)


def test_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    ids, mask = ragged_prompts()
    r = generate(model, ids, mask, max_new_tokens=6, num_samples=2, eos_token_id=EOS, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(0))
    assert r.logprobs.dtype == torch.float32
    logprobs, _ = r.response_logprobs(model)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, r.logprobs, atol=0.05, rtol=0)


def test_select_to_and_sequences():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    r = generate(model, ids, mask, max_new_tokens=5, num_samples=2, eos_token_id=EOS, pad_token_id=PAD)
    n, p, resp = len(r), r.prompt_ids.shape[1], r.response_ids.shape[1]
    assert (n, p) == (6, 7)
    input_ids, attention_mask, position_ids = r.sequences()
    assert input_ids.shape == attention_mask.shape == position_ids.shape == (n, p + resp)
    # positions count real tokens: 0..len-1 over prompt then response
    real = attention_mask.bool()
    for row in range(n):
        assert position_ids[row][real[row]].tolist() == list(range(int(real[row].sum())))
    sub = r.select([4, 1])
    assert torch.equal(sub.response_ids, r.response_ids[[4, 1]]) and sub.prompt_index.tolist() == [2, 0]
    assert torch.equal(r.select(slice(0, 2)).logprobs, r.logprobs[:2])
    assert len(r.select(r.finished)) == int(r.finished.sum())
    assert r.to("cpu").response_ids.device.type == "cpu"


def test_cat_pads_prompts_left_and_responses_right_and_keeps_logprobs():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    short = generate(model, ids[:1, :3], mask[:1, :3], max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    long = generate(model, ids[1:], mask[1:], max_new_tokens=6, num_samples=2, eos_token_id=EOS, pad_token_id=PAD,
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert short.prompt_ids.shape[1] < long.prompt_ids.shape[1]
    assert short.response_ids.shape[1] < long.response_ids.shape[1]
    both = Rollout.cat([short, long], pad_token_id=PAD)
    p, w = long.prompt_ids.shape[1], long.response_ids.shape[1]
    assert both.prompt_ids.shape == (5, p) and both.response_ids.shape == (5, w)
    # the short part's prompt is padded on the left, its response on the right
    assert torch.equal(both.prompt_ids[:1, p - short.prompt_ids.shape[1] :], short.prompt_ids)
    assert (both.prompt_mask[:1, : p - short.prompt_ids.shape[1]] == 0).all()
    assert torch.equal(both.response_ids[:1, : short.response_ids.shape[1]], short.response_ids)
    assert (both.response_mask[:1, short.response_ids.shape[1] :] == 0).all()
    assert both.prompt_index.tolist() == [0, 0, 0, 1, 1] and both.finished.tolist() == [
        *short.finished.tolist(), *long.finished.tolist(),
    ]  # fmt: skip
    # the padding changes no row's response log-probs under the model
    with torch.no_grad():
        got, _ = both.response_logprobs(model)
        torch.testing.assert_close(got[:1, : short.response_ids.shape[1]], short.response_logprobs(model)[0])
        torch.testing.assert_close(got[1:], long.response_logprobs(model)[0])
    torch.testing.assert_close(got, both.logprobs, atol=1e-5, rtol=0)  # = the recorded ones
    assert Rollout.cat([short], pad_token_id=PAD) is short


def test_bad_arguments_raise():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, torch.ones_like(ids), max_new_tokens=0, eos_token_id=EOS, pad_token_id=PAD)
