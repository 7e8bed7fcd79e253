"""GRPOModule: group advantages into the loss, no reference with beta 0, no extra forward with one
iteration, reward columns and None, zero-signal groups, option toggles, dynamic sampling, learning.

Every run is a real ``lightning.Trainer.fit`` of one to a few rollout steps on the tiny Llama.
"""

from __future__ import annotations

import gc
import math

import lightning as L
import pytest
import torch
from transformers import LlamaForCausalLM

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.stages import GenerationSpec, GRPOModule
from lightning_rlhf.stages.common import OptimSpec

G = 4  # group size of most tests


def group_score(prompts, completions, score, **_):
    """Test reward from the dataset column ``score`` (a list of G numbers per prompt): row ``i``
    gets ``score[i % G]``, so rewards within a group are fixed and known in advance."""
    return [s[i % len(s)] for i, s in enumerate(score)]


def maybe_reward(prompts, completions, kind, **_):
    """1 for rows whose prompt has ``kind == "scored"``, None (not applicable) for the others."""
    return [1.0 if k == "scored" else None for k in kind]


def char_length(prompts, completions, **_):
    """A response's length in characters: it varies within almost every group, whatever was sampled."""
    return [float(len(c)) for c in completions]


def count_great(prompts, completions, **_):
    """Fraction of the response's words that are 'great'."""
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


@pytest.fixture(scope="module")
def score_file(tmp_path_factory, write_jsonl):
    """Two prompts of equal length: a group with signal ([1, 0, 0, 0]) and a flat one ([2, 2, 2, 2])."""
    recs = [
        {"prompt": "reverse : red cat sun =", "score": [1.0, 0.0, 0.0, 0.0], "kind": "scored"},
        {"prompt": "reverse : dog sun moon =", "score": [2.0, 2.0, 2.0, 2.0], "kind": "other"},
    ]
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", recs)


def make(policy, *, scores=None, **kw) -> GRPOModule:
    kw.setdefault("reward_functions", [f"{__name__}.group_score"])
    kw.setdefault("num_generations", G)
    kw.setdefault("beta", 0.0)
    kw.setdefault("generation", GenerationSpec(max_new_tokens=4))
    kw.setdefault("optim", OptimSpec(learning_rate=1e-3, max_grad_norm=None, scheduler="constant"))
    kw.setdefault("log_samples_every_n_steps", 0)
    return GRPOModule(policy=str(policy), **kw)


def fit(module: GRPOModule, prompts, steps: int = 1, batch_size: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=batch_size, shuffle=False)
    trainer.fit(module, datamodule=dm)
    return trainer


def capture(module: GRPOModule) -> dict:
    """Record the rollout trained on and each optimiser step's gradients (before the step)."""
    seen: dict = {"grads": []}
    generate, step, optimise = module.generate, module.clip_and_step, module.optimise

    def gen(batch):
        seen["rollout"] = generate(batch)
        return seen["rollout"]

    def clip_and_step(opt, norm):
        seen["grads"].append(
            {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
        )
        step(opt, norm)

    def opt(experience, **kw):
        seen["trained"], seen["advantages"] = experience.rollout, experience.advantages
        return optimise(experience, **kw)

    module.generate, module.clip_and_step, module.optimise = gen, clip_and_step, opt
    return seen


def test_group_advantages_flow_into_the_loss_as_computed_by_hand(tiny_model_dir, score_file):
    m = make(tiny_model_dir)
    seen = capture(m)
    trainer = fit(m, score_file)
    # group 0 rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 -> [1.5, -0.5, -0.5, -0.5];
    # group 1 [2, 2, 2, 2] has no signal -> 0
    expected_adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(seen["advantages"], expected_adv, atol=1e-5)
    assert trainer.callback_metrics["rollout/zero_std_frac"] == 0.5
    # GRPO loss with ratio 1 (one iteration): -1/N sum_i A_i * mean_t log pi(o_i,t); its gradient at
    # the initial weights is what the optimiser received
    rollout = seen["rollout"]
    policy = load_causal_lm(str(tiny_model_dir))
    logprobs, _ = rollout.response_logprobs(policy)  # (N, R)
    lengths = rollout.response_mask.sum(-1)
    loss = -(expected_adv * (logprobs * rollout.response_mask).sum(-1) / lengths).mean()
    loss.backward()
    (grads,) = seen["grads"]
    for name, p in policy.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_zero_variance_groups_give_zero_advantage_and_no_policy_gradient(
    tiny_model_dir, write_jsonl, tmp_path, estimator
):
    flat = write_jsonl(
        tmp_path / "flat.jsonl",
        [
            {"prompt": "reverse : red cat sun =", "score": [0.3] * G},
            {"prompt": "reverse : sun =", "score": [1.0] * G},
        ],
    )
    m = make(tiny_model_dir, advantage_estimator=estimator)
    seen = capture(m)
    trainer = fit(m, flat)
    assert trainer.callback_metrics["rollout/zero_std_frac"] == 1.0
    assert torch.equal(seen["advantages"], torch.zeros(2 * G))
    (grads,) = seen["grads"]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())


def _llamas() -> int:
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def test_beta_zero_builds_no_reference_model(tiny_model_dir):
    before = _llamas()
    m = make(tiny_model_dir, beta=0.0)
    m.configure_model()
    assert m.reference is None and not m.uses_reference
    assert _llamas() - before == 1  # the policy only
    with_ref = make(tiny_model_dir, beta=0.04)
    with_ref.configure_model()
    assert with_ref.reference is not None
    assert _llamas() - before == 3  # + the second policy and its reference


def _count_full_forwards(module: GRPOModule) -> dict[str, int]:
    """Count the policy's full-sequence forwards (``use_cache=False``: not generation), by grad mode."""
    counts = {"grad": 0, "no_grad": 0}

    def hook(_mod, _args, kwargs):
        if kwargs.get("use_cache") is False:
            counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1

    module.configure_model()
    module.policy.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def test_one_iteration_makes_no_forward_for_old_logprobs(tiny_model_dir, score_file):
    one = make(tiny_model_dir, num_iterations=1)
    counts = _count_full_forwards(one)
    trainer = fit(one, score_file)
    assert counts == {"grad": 1, "no_grad": 0}
    assert trainer.callback_metrics["train/ratio_mean"] == 1.0  # old = logprobs.detach()

    two = make(tiny_model_dir, num_iterations=2)
    counts = _count_full_forwards(two)
    trainer = fit(two, score_file)
    assert counts == {"grad": 2, "no_grad": 1}  # the old log-probs, once per rollout
    assert trainer.callback_metrics["train/ratio_mean"] != 1.0  # the second pass sees the moved policy


def test_reward_functions_get_extra_columns_and_may_return_none(tiny_model_dir, score_file):
    m = make(
        tiny_model_dir,
        reward_functions=[f"{__name__}.group_score", f"{__name__}.maybe_reward"],
        reward_weights=[1.0, 10.0],
        diagnostic_functions=[f"{__name__}.count_great"],
    )
    captured = {}
    score = m.score

    def spy(rollout, batch):
        captured["scores"] = score(rollout, batch)
        return captured["scores"]

    m.score = spy
    trainer = fit(m, score_file)
    s = captured["scores"]
    assert torch.isnan(s.parts["maybe_reward"][G:]).all() and (s.parts["maybe_reward"][:G] == 1.0).all()
    # None counts 0: group 0 gets 1*score + 10*1, group 1 gets 1*score
    assert s.raw.tolist() == [11.0, 10.0, 10.0, 10.0, 2.0, 2.0, 2.0, 2.0]
    metrics = trainer.callback_metrics
    assert metrics["rollout/reward/maybe_reward"] == 1.0  # mean over the rows it applies to
    assert math.isclose(float(metrics["rollout/reward/group_score"]), (1.0 + 8.0) / 8, rel_tol=1e-6)
    assert "rollout/diag/count_great" in metrics


def test_scale_by_std_changes_the_update(tiny_model_dir, write_jsonl, tmp_path):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "reverse : red cat sun =", "score": [1.0, 0, 0, 0]},
            {"prompt": "reverse : sun =", "score": [4.0, 0, 0, 0]},
        ],
    )
    runs = {}
    for scale in (True, False):
        m = make(tiny_model_dir, scale_by_std=scale)
        seen = capture(m)
        fit(m, prompts)
        runs[scale] = seen
    assert torch.equal(
        runs[True]["rollout"].response_ids, runs[False]["rollout"].response_ids
    )  # same samples
    # GRPO: both groups [1.5, -0.5, -0.5, -0.5]; Dr. GRPO: r - mean, [0.75, -0.25, ...] and 4x that
    assert torch.allclose(runs[True]["advantages"][G:], runs[True]["advantages"][:G], atol=1e-5)
    assert torch.allclose(runs[False]["advantages"][G:], 4 * runs[False]["advantages"][:G])
    g_std, g_dr = runs[True]["grads"][0], runs[False]["grads"][0]
    assert not all(torch.allclose(g_std[n], g_dr[n]) for n in g_std)


def test_clip_eps_high_lowers_the_clip_fraction(tiny_model_dir, score_file):
    clipfrac = {}
    for high in (None, 100.0):
        m = make(
            tiny_model_dir,
            num_iterations=2,
            clip_eps=0.1,
            clip_eps_high=high,
            optim=OptimSpec(learning_rate=3e-2),
        )
        trainer = fit(m, score_file)
        clipfrac[high] = float(trainer.callback_metrics["train/clipfrac"])
    assert clipfrac[None] > clipfrac[100.0] >= 0.0


def test_kl_goes_into_the_reward_or_the_loss(tiny_model_dir):
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]])
    in_reward = make(tiny_model_dir, beta=0.1, kl_in_reward=True)
    assert torch.allclose(in_reward.sequence_rewards(scores, kl, mask), torch.tensor([0.9, 0.0, -0.1, 0.0]))
    in_loss = make(tiny_model_dir, beta=0.1)
    assert torch.equal(in_loss.sequence_rewards(scores, kl, mask), scores)


def test_dynamic_sampling_refills_the_batch_with_groups_that_have_signal(tiny_model_dir, score_file):
    m = make(tiny_model_dir, dynamic_sampling=True, max_resample_rounds=2)
    seen = capture(m)
    trainer = fit(m, score_file)
    # each round keeps only prompt 0's group, so two rounds fill the batch of two prompts
    assert trainer.callback_metrics["rollout/sampling_rounds"] == 2
    assert trainer.callback_metrics["rollout/groups"] == 2
    assert trainer.callback_metrics["rollout/zero_std_frac"] == 0.5
    assert seen["trained"].prompt_index.tolist() == [0] * (2 * G)
    assert len(seen["grads"]) == 1


def test_dynamic_sampling_skips_the_update_when_no_group_has_signal(tiny_model_dir, write_jsonl, tmp_path):
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"prompt": "reverse : red =", "score": [1.0] * G}])
    m = make(tiny_model_dir, dynamic_sampling=True, max_resample_rounds=1)
    seen = capture(m)
    trainer = fit(m, flat, batch_size=1)
    assert trainer.callback_metrics["rollout/sampling_rounds"] == 2  # the first round + one extra
    assert trainer.callback_metrics["train/skipped"] == 1.0 and seen["grads"] == []


def test_options_that_contradict_each_other_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="beta"):
        make(tiny_model_dir, kl_coef=0.1)
    with pytest.raises(ValueError, match="num_generations"):
        make(tiny_model_dir, advantage_estimator="rloo", num_generations=1)
    with pytest.raises(ValueError, match="num_samples"):
        make(tiny_model_dir, generation=GenerationSpec(num_samples=3))


@pytest.mark.parametrize("config", ["grpo.yaml", "grpo_sentiment.yaml", "rloo_sentiment.yaml", "grpo_reverse.yaml"])
def test_shipped_configs_parse(repo_root, tiny_model_dir, config):
    from lightning_rlhf.cli import cli_main

    cli = cli_main(
        [
            "--config", str(repo_root / "configs" / "demo" / config),
            "--model.init_args.policy.path", str(tiny_model_dir),
            "--model.init_args.reward_model", "null",
            "--model.init_args.reward_functions", "[lightning_rlhf.demo.rewards.gold_reward]",
            "--trainer.logger", "false",
        ],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model, GRPOModule)


def test_fabric_loop_with_kl_loss_minibatches_and_microbatches(tiny_model_dir, prompt_file):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module = make(
        tiny_model_dir,
        reward_functions=[f"{__name__}.char_length"],  # signal in the groups, so every weight gets a gradient
        beta=0.1,
        num_iterations=2,
        mini_batch_size=4,
        micro_batch_size=2,
        loss_agg="token_mean",
        schedule_steps=2,
    )
    with fabric.init_module():
        module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizers, _ = module.configure_optimizers()
    model, *optimizers = fabric.setup(module, *optimizers)
    dm = RLHFDataModule(str(prompt_file), kind="prompt", tokenizer=str(tiny_model_dir), batch_size=2)
    dm.setup("fit")
    logged = []
    module.log_dict = lambda metrics, **_: logged.append(metrics)
    for i, batch in enumerate(dm.train_dataloader()):
        model.training_step(fabric.to_device(batch), i)
    assert module.rollout_step == 2 and module.schedulers()[0].last_epoch == 2
    assert all(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    # 2 iterations x 2 mini-batches: the policy has moved away from the reference by the later ones
    assert logged[-1]["train/kl_loss"] > 0 and "rollout/kl" in logged[-1]


@pytest.mark.slow
def test_reward_rises_on_a_tiny_problem(tiny_model_dir, write_jsonl, tmp_path):
    """From a random tiny Llama, a reward paying for the word 'great' gets learned in a few steps."""
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": p} for p in ("review the phone .", "review the lamp .")]
    )
    m = make(
        tiny_model_dir,
        reward_functions=[f"{__name__}.count_great"],
        num_generations=16,
        generation=GenerationSpec(max_new_tokens=2),
        optim=OptimSpec(learning_rate=3e-2, scheduler="constant"),
        num_iterations=2,
    )
    rewards = []
    log_rollout = m.log_rollout

    def spy(rollout, scores, kl, extra=None):
        rewards.append(float(scores.raw.mean()))
        return log_rollout(rollout, scores, kl, extra)

    m.log_rollout = spy
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=14, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(m, datamodule=RLHFDataModule(train_files=str(prompts), kind="prompt", batch_size=2))
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.3, str(rewards)
