"""``generation.dtype``: the ``hf`` sampler's persistent low-precision copy of the policy.

- float32 on an fp32 policy: no copy, the same rollouts and updates as today, bit for bit;
- bfloat16: after every optimiser step the copy's weights are the policy's cast to bf16 (LoRA merged),
  written in place (same storages, so the static decoder kept for the copy is reused); its log-probs
  are not the trainer's, so the mismatch is logged and the old log-probs are recomputed;
- greedy outputs of the copy equal transformers' ``generate`` on an independently built bf16 model;
- a GRPO fit sampling from the bf16 copy learns a tiny task.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec, load_causal_lm
from lightning_rlhf.models.distributed import policy_weights
from lightning_rlhf.rollout import GenerationSpec, Rollout, generate, static_decode
from lightning_rlhf.rollout.sampler_copy import SamplerCopy
from lightning_rlhf.stages import GRPOModule, PPOModule
from lightning_rlhf.stages.common import OptimSpec


def count_great(prompts, completions, **_):
    """Fraction of the response's words that are 'great'."""
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, write_jsonl):
    recs = [{"prompt": p} for p in ("review the phone .", "review the lamp .")]
    return write_jsonl(tmp_path_factory.mktemp("sampler-copy") / "p.jsonl", recs)


def make(policy, **kw) -> GRPOModule:
    kw.setdefault("reward_functions", [f"{__name__}.count_great"])
    kw.setdefault("num_generations", 4)
    kw.setdefault("beta", 0.0)
    kw.setdefault("optim", OptimSpec(learning_rate=1e-2, scheduler="constant"))
    kw.setdefault("log_samples_every_n_steps", 0)
    return GRPOModule(policy=policy, **kw)


def fit(module, prompts, epochs: int = 1) -> list[dict]:
    logged: list[dict] = []
    log_rollout = module.log_rollout

    def spy(rollout, scores, kl, extra=None):
        metrics = log_rollout(rollout, scores, kl, extra)
        logged.append(dict(metrics))
        return metrics

    module.log_rollout = spy
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=2))
    return logged


def test_float32_on_an_fp32_policy_samples_and_trains_as_today_bit_for_bit(tiny_model_dir, prompts):
    runs = {}
    for dtype in ("auto", "float32"):
        torch.manual_seed(0)
        m = make(str(tiny_model_dir), generation=GenerationSpec(max_new_tokens=4, dtype=dtype), num_iterations=2)
        rollouts = []
        generate_ = m.generate
        m.generate = lambda batch, g=generate_, out=rollouts: out.append(g(batch)) or out[-1]
        fit(m, prompts, epochs=2)
        assert m._sampler_copy is None and m.sampler_logprobs_are_trainers()
        runs[dtype] = (rollouts, {k: v.clone() for k, v in m.policy.state_dict().items()})
    (ra, wa), (rb, wb) = runs.values()
    assert len(ra) == len(rb) == 2
    for a, b in zip(ra, rb, strict=True):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _copy_matches(module) -> None:
    """The copy's parameters are the policy's (LoRA merged) cast to bf16, exactly."""
    copy_params = dict(module._sampler_copy.model.named_parameters())
    weights = dict(policy_weights(module.policy))
    assert set(copy_params) == set(weights)
    for name, w in weights.items():
        assert copy_params[name].dtype == torch.bfloat16
        assert torch.equal(copy_params[name], w.to(torch.bfloat16)), name


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_copy_is_the_policy_cast_after_every_optimiser_step_in_place(tiny_model_dir, prompts, lora):
    policy = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8) if lora else None)
    m = make(policy, num_iterations=2, generation=GenerationSpec(max_new_tokens=4, dtype="bfloat16",
                                                                cache_implementation="static"))  # fmt: skip
    checks = {"steps": 0, "storages": set(), "decoders": set(), "sampled_from": set()}
    step = m.clip_and_step

    def clip_and_step(opt, norm):
        step(opt, norm)
        _copy_matches(m)
        checks["steps"] += 1
        checks["storages"].add(tuple(p.data_ptr() for p in m._sampler_copy.model.parameters()))

    generate_ = m.generate

    def gen(batch):
        out = generate_(batch)
        copy_model = m._sampler_copy.model
        checks["sampled_from"].add(id(copy_model))
        checks["copy"] = copy_model
        checks["decoders"].add(id(static_decode.kept(copy_model)))
        assert static_decode.kept(m.policy) is None  # the policy itself did not sample
        return out

    m.clip_and_step, m.generate = clip_and_step, gen
    logged = fit(m, prompts, epochs=2)
    assert checks["steps"] == 4  # 2 rollouts x 2 iterations
    assert len(checks["storages"]) == 1  # written in place
    assert len(checks["sampled_from"]) == 1 and len(checks["decoders"]) == 1  # one copy, one kept decoder
    assert m._sampler_copy is None  # dropped at the end of fit (rebuilt from the policy by the next one)
    copy_params = dict(checks["copy"].named_parameters())
    assert not any("lora_" in n for n in copy_params)
    assert not any("_sampler_copy" in k for k in m.state_dict())  # not part of the module / checkpoint
    # the copy's log-probs are not the trainer's: the mismatch is logged, the old log-probs recomputed
    assert not m.sampler_logprobs_are_trainers()
    assert all(0 < x["rollout/logprob_diff_max"] < 1.0 for x in logged), logged
    if lora:  # the adapter moved (B starts at 0): the merged copy differs from the base cast
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(copy_params[q], base.state_dict()[q].bfloat16())


def test_greedy_outputs_equal_transformers_generate_of_a_bf16_model(tiny_model_dir, demo_tokenizer):
    policy = load_causal_lm(str(tiny_model_dir))
    copy = SamplerCopy(policy, torch.bfloat16)
    ids = torch.tensor(demo_tokenizer(["review the phone .", "review the lamp ."])["input_ids"])
    mask = torch.ones_like(ids)
    pad = demo_tokenizer.pad_token_id
    for update in range(2):
        if update:  # the policy moves; the copy is brought up to date in place
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            copy.sync(policy)
        ref = AutoModelForCausalLM.from_config(policy.config, dtype=torch.bfloat16).eval()
        ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in policy.state_dict().items()})
        expected = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                pad_token_id=pad, eos_token_id=None)[:, ids.shape[1]:]  # fmt: skip
        r: Rollout = generate(copy.model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=[], pad_token_id=pad)
        assert torch.equal(r.response_ids, expected), update
        fp32 = generate(policy, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=[], pad_token_id=pad)
        if update == 1:  # bf16 log-probs are recorded and near the fp32 policy's
            assert (r.logprobs - fp32.logprobs).abs().max() < 0.5


def test_options_that_cannot_work_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="generation.vllm.dtype"):
        GenerationSpec(engine="vllm", dtype="bfloat16")
    with pytest.raises(ValueError, match="generation.dtype must be"):
        GenerationSpec(dtype="int8")
    with pytest.raises(ValueError, match="generation.dtype='bfloat16'"):
        PPOModule(str(tiny_model_dir), reward_functions=[f"{__name__}.count_great"], recompute_logprobs=False,
                  generation=GenerationSpec(dtype="bfloat16"))  # fmt: skip


@pytest.mark.slow
def test_grpo_learns_a_tiny_task_sampling_from_the_bf16_copy(tiny_model_dir, write_jsonl, tmp_path):
    """As ``test_grpo.py``'s tiny problem: a reward paying for the word 'great' is learned, with the
    rollouts sampled from the bf16 copy."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("review the phone .", "review the lamp .")])
    m = make(str(tiny_model_dir), num_generations=16, num_iterations=2, optim=OptimSpec(learning_rate=3e-2, scheduler="constant"),
             generation=GenerationSpec(max_new_tokens=2, dtype="bfloat16"))  # fmt: skip
    logged = fit(m, prompts, epochs=14)
    rewards = [x["rollout/reward_mean"] for x in logged]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.3, str(rewards)
    assert m._sampler_copy is None  # dropped at the end of fit


def test_loaded_causal_lm_heads_get_contiguous_inputs(tiny_model_dir):
    """``logits_to_keep`` slices the hidden states (a strided view), which torch's CPU bf16 linear turns
    into a copy of the weight per row; the loader's pre-hook hands the LM head a contiguous input."""
    model = load_causal_lm(str(tiny_model_dir)).to(torch.bfloat16)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(10, 40, (3, 9))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=4).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -4:], rtol=0, atol=0)
