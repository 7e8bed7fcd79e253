"""generate(cache_implementation="static"): the same rollouts as the dynamic cache (tokens, masks, EOS,
generator state), the decoder kept and reused across calls, rebuilt when weights are replaced; the
CUDA-graph replay against the eager path where a GPU is at hand; the option through a GRPO run."""

import lightning as L
import pytest
import torch
from test_generate import EOS, PAD, ragged_prompts, reference_generate, rollout_rows, tiny_llama

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.rollout import GenerationSpec, Rollout, generate, static_decode
from lightning_rlhf.stages import GRPOModule
from lightning_rlhf.stages.common import OptimSpec

LOGPROB_ATOL = 1e-5  # fp32: the static cache attends over extra masked columns, so sums round differently


@pytest.fixture(autouse=True)
def _release():
    yield
    static_decode.release()


def both(model, ids, mask, seed=3, **kw) -> tuple[Rollout, Rollout, torch.Generator, torch.Generator]:
    """The dynamic and the static rollout of the same call, each from a generator seeded `seed`."""
    g_dyn, g_st = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    kw.setdefault("pad_token_id", PAD)
    dyn = generate(model, ids, mask, generator=g_dyn, cache_implementation="dynamic", **kw)
    st = generate(model, ids, mask, generator=g_st, cache_implementation="static", **kw)
    return dyn, st, g_dyn, g_st


def assert_same(dyn: Rollout, st: Rollout) -> None:
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "prompt_index"):
        assert torch.equal(getattr(dyn, name), getattr(st, name)), name
    torch.testing.assert_close(st.logprobs, dyn.logprobs, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 12, 0.9), (1.3, 0, 0.8), (0.0, 0, 1.0)],
    ids=["plain", "topk_topp", "hot_topp", "greedy"],
)
def test_static_equals_dynamic_and_the_full_forward_reference(temperature, top_k, top_p):
    model = tiny_llama()
    ids, mask = ragged_prompts()  # ragged: rows are left-padded by different amounts
    eos_ids = [EOS, 5, 6, 7]  # several stop ids so that some rows stop early and others don't
    kw = dict(max_new_tokens=14, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=3)
    dyn, st, g_dyn, g_st = both(model, ids, mask, eos_token_id=eos_ids, **kw)
    assert_same(dyn, st)
    assert torch.equal(g_dyn.get_state(), g_st.get_state())  # as many draws: the next rollout matches too
    ref_tokens, ref_logprobs, ref_done = reference_generate(
        model, ids, mask, eos_ids=eos_ids, generator=torch.Generator().manual_seed(3), **kw
    )
    assert rollout_rows(st) == ref_tokens and st.finished.tolist() == ref_done
    if temperature > 0:  # the sampled cases exercise both a stopped and a cut row
        assert st.finished.any() and not st.finished.all()


@pytest.mark.parametrize("check_every", [1, 4])
def test_eos_stops_and_the_generator_rewind_match_with_pad_equal_to_eos(check_every):
    model = tiny_llama(pad_token_id=EOS, eos_token_id=EOS)
    ids, mask = ragged_prompts()
    ids = ids.masked_fill(mask == 0, EOS)
    dyn, st, g_dyn, g_st = both(model, ids, mask, seed=0, max_new_tokens=30, num_samples=4,
                                eos_token_id=[EOS, *range(9, 17)], pad_token_id=EOS, stop_check_every=check_every)  # fmt: skip
    assert_same(dyn, st)
    assert st.finished.all()  # every row stopped before max_new_tokens: the loop ended early
    assert st.response_ids.shape[1] < 30
    assert torch.equal(g_dyn.get_state(), g_st.get_state())


def test_eager_attention_gets_a_float_mask_and_the_same_tokens():
    model = tiny_llama()
    model.config._attn_implementation = "eager"  # eager attention adds the mask as a float bias
    ids, mask = ragged_prompts()
    dyn, st, _, _ = both(model, ids, mask, max_new_tokens=10, num_samples=2, eos_token_id=EOS)
    assert_same(dyn, st)
    decoder = static_decode.kept(model)
    assert decoder.mask.dtype == torch.float32 and not decoder.bool_mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_grouped_decode_attention_gives_the_same_rollout_and_restores_the_model(impl):
    model = tiny_llama()  # 4 query heads on 2 KV heads
    model.config._attn_implementation = impl
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=20, num_samples=3, eos_token_id=[EOS, 5], pad_token_id=PAD)
    dyn = generate(model, ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    calls = []
    grouped = static_decode.grouped_decode_attention

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])  # query length
        return grouped(*args, **kwargs)

    static_decode.grouped_decode_attention = counting
    try:
        st = generate(model, ids, mask, generator=torch.Generator().manual_seed(4), cache_implementation="static",
                      decode_attention="grouped", **kw)  # fmt: skip
    finally:
        static_decode.grouped_decode_attention = grouped
    assert_same(dyn, st)
    assert calls and set(calls) == {1}  # every decode step (2 layers each), never the prefill
    assert len(calls) == 2 * (st.response_ids.shape[1] - 1)
    assert model.config._attn_implementation == impl  # set back after the loop


def test_grouped_attention_equals_sdpa_with_repeated_heads_for_any_query_length():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    n, h, kvh, q, length, d = 3, 6, 2, 4, 9, 8
    query, key, value = (torch.randn(n, x, y, d, generator=g) for x, y in ((h, q), (kvh, length), (kvh, length)))
    mask = torch.rand(n, 1, q, length, generator=g) > 0.3
    mask[..., 0] = True  # every query attends to something
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = h // kvh, True
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = static_decode.grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    bias = torch.zeros(n, 1, q, length).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager's float mask
    got_bias, _ = static_decode.grouped_decode_attention(module, query, key, value, bias, scaling=0.3)
    torch.testing.assert_close(got_bias, want, atol=1e-6, rtol=0)


SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
FAMILIES = {  # as in tests/test_architectures.py
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "phi3": dict(SIZE, intermediate_size=64, num_key_value_heads=2),
    "gpt_neox": dict(SIZE, intermediate_size=64, rotary_pct=0.5),
    "qwen2": dict(SIZE, intermediate_size=64, num_key_value_heads=2),
    "opt": dict(SIZE, ffn_dim=64, word_embed_proj_dim=32),
}  # fmt: skip


def family_model(name: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(name, vocab_size=64, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD,
                                  tie_word_embeddings=False, **{**FAMILIES.get(name, {}), **kw})  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_other_families_give_the_same_rollout(name):
    """Learned positions (gpt2, opt), fused projections (phi3, gpt_neox), partial rotary, q/k/v biases."""
    model = family_model(name)
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=12, temperature=0.9, num_samples=2, eos_token_id=[EOS, 5], pad_token_id=PAD)
    dyn = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    for attention in ("model", "grouped"):
        st = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), cache_implementation="static",
                      decode_attention=attention, **kw)  # fmt: skip
        assert_same(dyn, st)


def test_sliding_window_models_and_soft_capping_are_refused_clearly():
    model = family_model("gemma2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         num_key_value_heads=2, head_dim=8, sliding_window=16, attn_logit_softcapping=50.0)  # fmt: skip
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD, cache_implementation="static")
    q = torch.zeros(1, 4, 1, 8)
    kv = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        static_decode.grouped_decode_attention(torch.nn.Module(), q, kv, kv, None, softcap=50.0)


def test_unsupported_attention_is_a_clear_error():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match="supports the 'sdpa' and 'eager'"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD, cache_implementation="static")


def test_decoder_is_kept_for_the_same_shape_and_reset_between_calls():
    model = tiny_llama()
    ids, mask = ragged_prompts(lengths=(3, 7, 5))
    kw = dict(max_new_tokens=6, num_samples=2, eos_token_id=EOS, pad_token_id=PAD, cache_implementation="static")
    first = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    decoder = static_decode.kept(model)
    assert decoder.max_len == static_decode.LENGTH_BUCKET  # 7 + 6 positions, rounded up
    assert decoder.cache.get_seq_length() == 7 + 5  # prompt width + the decode steps (the last token is not fed)
    # a narrower prompt batch of the same rows lands in the same bucket: same decoder, emptied first
    ids2, mask2 = ragged_prompts(lengths=(2, 4, 3), seed=5)
    second = generate(model, ids2, mask2, generator=torch.Generator().manual_seed(0), **kw)
    assert static_decode.kept(model) is decoder
    fresh = generate(model, ids2, mask2, generator=torch.Generator().manual_seed(0), **{**kw, "cache_implementation": "dynamic"})
    assert_same(fresh, second)  # nothing of the first call leaks into the second
    again = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert_same(first, again)
    # other options: a second decoder kept beside the first
    generate(model, ids, mask, decode_attention="grouped", **kw)
    assert static_decode.kept(model) is not decoder
    generate(model, ids, mask, **kw)
    assert static_decode.kept(model) is decoder
    # another number of rows: a new decoder
    generate(model, ids[:2], mask[:2], **kw)
    assert static_decode.kept(model) is not decoder
    static_decode.release(model)
    assert static_decode.kept(model) is None


def test_weights_changed_in_place_are_seen_and_replaced_weights_rebuild_the_decoder():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    before = generate(model, ids, mask, cache_implementation="static", **kw)
    decoder = static_decode.kept(model)
    with torch.no_grad():  # an optimiser step: same storage, new values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = generate(model, ids, mask, cache_implementation="static", **kw)
    assert static_decode.kept(model) is decoder
    assert_same(generate(model, ids, mask, **kw), moved)
    assert not torch.equal(before.response_ids, moved.response_ids)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # new storage
    replaced = generate(model, ids, mask, cache_implementation="static", **kw)
    assert static_decode.kept(model) is not decoder
    assert_same(generate(model, ids, mask, **kw), replaced)


def test_lora_wrapped_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask = ragged_prompts()
    dyn, st, _, _ = both(model, ids, mask, max_new_tokens=8, num_samples=2, eos_token_id=[EOS, 5])
    assert_same(dyn, st)


def test_generation_spec_rejects_an_unknown_cache():
    assert GenerationSpec(cache_implementation="static").cuda_graphs is True
    with pytest.raises(ValueError, match="cache_implementation must be 'dynamic' or 'static'"):
        GenerationSpec(cache_implementation="paged")
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match="cache_implementation"):
        generate(tiny_llama(), ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
                 cache_implementation="Static")  # fmt: skip


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_rollout():
    model = tiny_llama()
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, num_samples=2, eos_token_id=[EOS, 5], pad_token_id=PAD)
    dyn = generate(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    compiled = generate(model, ids, mask, generator=torch.Generator().manual_seed(2), cache_implementation="static",
                        torch_compile=True, **kw)  # fmt: skip
    assert static_decode.kept(model).step_fn is static_decode.compiled_decode_step()
    assert_same(dyn, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_equals_the_eager_dynamic_path():
    model = tiny_llama().cuda()
    ids, mask = (t.cuda() for t in ragged_prompts())
    for temperature in (0.0, 0.8):
        kw = dict(max_new_tokens=12, temperature=temperature, top_k=20, num_samples=3, eos_token_id=[EOS, 5],
                  pad_token_id=PAD)  # fmt: skip
        dyn = generate(model, ids, mask, generator=torch.Generator("cuda").manual_seed(1), **kw)
        graphed = generate(model, ids, mask, generator=torch.Generator("cuda").manual_seed(1),
                           cache_implementation="static", cuda_graphs=True, **kw)  # fmt: skip
        decoder = static_decode.kept(model)
        assert decoder.graph is not None  # captured (max_new_tokens > warm-up steps + 1)
        assert_same(dyn, graphed)
    graph = decoder.graph
    again = generate(model, ids, mask, generator=torch.Generator("cuda").manual_seed(1),
                     cache_implementation="static", cuda_graphs=True, **kw)  # fmt: skip
    assert static_decode.kept(model).graph is graph  # replayed, not captured again
    assert_same(graphed, again)
    compiled = generate(model, ids, mask, generator=torch.Generator("cuda").manual_seed(1),
                        cache_implementation="static", cuda_graphs=True, torch_compile=True, **kw)  # fmt: skip
    assert static_decode.kept(model).graph is not None
    assert_same(dyn, compiled)


def test_grpo_run_samples_with_the_static_cache(tiny_model_dir, write_jsonl, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "reverse : red cat sun ="}, {"prompt": "dog ="}])
    rollouts = {}
    for cache in ("dynamic", "static"):
        L.seed_everything(0)
        module = GRPOModule(
            policy=str(tiny_model_dir),
            reward_functions=[f"{__name__}.length_reward"],
            num_generations=2,
            beta=0.0,
            generation=GenerationSpec(max_new_tokens=5, cache_implementation=cache),
            optim=OptimSpec(learning_rate=1e-3, max_grad_norm=None, scheduler="constant"),
            log_samples_every_n_steps=0,
        )
        seen = []
        generate_fn = module.generate
        module.generate = lambda batch, f=generate_fn, s=seen: s.append(f(batch)) or s[-1]
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, datamodule=RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=2,
                                                      shuffle=False))  # fmt: skip
        rollouts[cache] = seen[0]
        assert (static_decode.kept(module.policy) is not None) == (cache == "static")
    assert_same(rollouts["dynamic"], rollouts["static"])


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]
