"""OnlineRLModule (what PPO and GRPO share): frozen models, scoring and shaping, KL rewards, state."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_rlhf.models import LoraSpec, ModelSpec, load_causal_lm
from lightning_rlhf.models.forward import sequence_logprobs
from lightning_rlhf.rollout import Experience, Rollout
from lightning_rlhf.rollout.scoring import RunningMoments
from lightning_rlhf.stages import GenerationSpec, OnlineRLModule


def count_great(prompts, completions, **_):
    """Test reward: how many times a response says 'great'."""
    return [float(c.split().count("great")) for c in completions]


def length_reward(prompts, completions, **_):
    return [float(len(c.split())) for c in completions]


def prompt_batch(tokenizer, texts=("review the phone .", "what do you think of the lamp ?")) -> dict:
    prompts = [[{"role": "user", "content": t}] for t in texts]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "prompt": prompts,
        "extra": [{} for _ in prompts],
        "index": torch.arange(len(prompts)),
    }


def module(policy, **kw) -> OnlineRLModule:
    kw.setdefault("generation", GenerationSpec(max_new_tokens=6))
    m = OnlineRLModule(policy=str(policy) if not isinstance(policy, ModelSpec) else policy, **kw)
    m.configure_model()
    return m


def test_running_moments_match_the_whole_stream_and_round_trip():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 8)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks).double()
    assert rm.mean == pytest.approx(float(allx.mean()), abs=1e-12)
    assert rm.std == pytest.approx(float(allx.std()), abs=1e-12)
    other = RunningMoments()
    other.load_state_dict(copy.deepcopy(rm.state_dict()))
    assert (other.mean, other.std, other.count) == (rm.mean, rm.std, rm.count)


def test_each_score_shaping_option_changes_the_scores(tiny_model_dir):
    raw = torch.tensor([3.0, -1.0, 0.5, 10.0])
    finished = torch.tensor([True, False, True, False])
    plain = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0)
    assert torch.equal(plain.shape_scores(raw, finished), raw)

    pen = module(
        tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0, missing_eos_penalty=2.0
    )
    assert pen.shape_scores(raw, finished).tolist() == [3.0, -3.0, 0.5, 8.0]

    clip = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0, reward_clip=1.0)
    assert clip.shape_scores(raw, finished).tolist() == [1.0, -1.0, 0.5, 1.0]

    norm = module(
        tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0, normalize_rewards=True
    )
    out = norm.shape_scores(raw, finished)
    assert torch.allclose(out, (raw - raw.mean()) / raw.std(), atol=1e-6)
    assert norm.reward_moments.count == 4 and "reward_moments" in norm.online_state_dict()


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token(tiny_model_dir):
    m = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.5)
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # row 1 stopped after one token
    rewards, kl = m.kl_shaped_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, mask)
    # k1 = logprobs - ref on the mask: row 0 [0.5, -1, 0], row 1 [1, 0, 0]; reward = -0.5 * kl (+ score at the end)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 0.5, 10.0], [19.5, 0.0, 0.0]]


def test_frozen_models_are_not_registered_nor_in_state_dict(tiny_model_dir, rm_dir):
    m = module(tiny_model_dir, reward_model=str(rm_dir))
    assert m.reference is not None and m.reward_model is not None
    names = {n for n, _ in m.named_modules()}
    assert "policy" in names and not any(n.startswith(("_frozen", "reference", "reward")) for n in names)
    assert all(k.startswith("policy.") for k in m.state_dict())
    for frozen in (m.reference, m.reward_model):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    # the reference is a second copy of the policy's weights, not the same tensors
    assert m.reference.lm_head.weight.data_ptr() != m.policy.lm_head.weight.data_ptr()
    assert torch.equal(m.reference.lm_head.weight, m.policy.lm_head.weight)


def test_no_kl_means_no_reference_model(tiny_model_dir):
    m = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0)
    assert m.reference is None and not m.uses_reference
    rollout = m.generate(prompt_batch(m.tokenizer))
    assert m.reference_logprobs(rollout) is None


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_model_dir):
    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8))
    m = module(spec, reward_functions=[f"{__name__}.count_great"])
    assert m.reference_is_adapter_off and m.reference is None
    with torch.no_grad():  # move the adapter away from its zero init, so policy != base
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    rollout = m.generate(prompt_batch(m.tokenizer))
    ref = m.reference_logprobs(rollout)
    base = load_causal_lm(str(tiny_model_dir), trainable=False)
    expected, _ = rollout.response_logprobs(base, 1.0)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(m.policy_logprobs(rollout), expected, atol=1e-3)


def test_generation_spec_gives_num_samples_rows_per_prompt_and_old_logprobs(tiny_model_dir):
    m = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"],
               generation=GenerationSpec(max_new_tokens=5, num_samples=3, temperature=0.7))  # fmt: skip
    rollout = m.generate(prompt_batch(m.tokenizer))
    assert len(rollout) == 6 and rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.response_ids.shape[1] <= 5
    # the recorded log-probs are those of a training forward at the sampling temperature
    assert torch.allclose(m.policy_logprobs(rollout), rollout.logprobs, atol=1e-5)


def test_score_weights_reward_sources_and_logs_diagnostics_apart(tiny_model_dir, rm_dir):
    m = module(
        tiny_model_dir,
        reward_model=str(rm_dir),
        reward_functions=[f"{__name__}.length_reward"],
        reward_weights=[2.0, 0.5],
        diagnostic_functions=[f"{__name__}.count_great"],
    )
    batch = prompt_batch(m.tokenizer)
    rollout = m.generate(batch)
    scores = m.score(rollout, batch)
    rm, length = scores.parts["reward_model"], scores.parts["length_reward"]
    assert torch.allclose(scores.raw, 2.0 * rm + 0.5 * length)
    assert set(scores.diagnostics) == {"count_great"}
    assert scores.completions == rollout.decode_responses(m.tokenizer)
    metrics = m.rollout_metrics(rollout, scores, torch.zeros_like(rollout.logprobs))
    assert "rollout/diag/count_great" in metrics and "rollout/reward/length_reward" in metrics


def test_reward_weights_must_match_the_sources(tiny_model_dir):
    with pytest.raises(ValueError, match="reward_weights"):
        OnlineRLModule(
            policy=str(tiny_model_dir), reward_functions=[f"{__name__}.count_great"], reward_weights=[1, 2]
        )
    with pytest.raises(ValueError, match="reward_model"):
        OnlineRLModule(policy=str(tiny_model_dir))


def test_kl_target_needs_a_positive_initial_kl_coef(tiny_model_dir):
    # the adaptive controller multiplies its coefficient: from 0 it would never move
    for coef in (0.0, -0.1):
        with pytest.raises(ValueError, match="kl_target.*positive initial kl_coef"):
            OnlineRLModule(
                policy=str(tiny_model_dir), reward_functions=[f"{__name__}.count_great"], kl_coef=coef, kl_target=1.0
            )
    ok = OnlineRLModule(
        policy=str(tiny_model_dir), reward_functions=[f"{__name__}.count_great"], kl_coef=0.1, kl_target=1.0
    )
    assert ok.kl_ctl.value == 0.1 and ok.kl_ctl.target == 1.0


def test_experience_select_trims_a_minibatch_to_the_columns_it_uses(tiny_model_dir):
    rollout = Rollout(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]),
        response_ids=torch.tensor([[11, 2, 0, 0], [12, 13, 14, 15], [16, 17, 2, 0]]),
        response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
        logprobs=torch.randn(3, 4),
        finished=torch.tensor([True, False, True]),
        prompt_index=torch.arange(3),
    )
    values = torch.arange(12.0).view(3, 4)
    exp = Experience(rollout, values=values, advantages=torch.tensor([0.5, 1.5, 2.5]))  # (N, R) and (N,)
    selected = exp.select(torch.tensor([2, 0]))
    mb = selected.rollout
    assert mb.prompt_ids.tolist() == [[4, 5, 6], [0, 5, 6]]
    assert mb.response_ids.tolist() == [[16, 17, 2], [11, 2, 0]]
    assert selected.values.tolist() == [[8.0, 9.0, 10.0], [0.0, 1.0, 2.0]]
    assert selected.advantages.tolist() == [2.5, 0.5]  # one per row, not trimmed
    assert selected.old_logprobs is None and len(selected) == 2
    # the trimmed rows give the same log-probs as the untrimmed ones
    model = load_causal_lm(str(tiny_model_dir), trainable=False)
    full = rollout.select(torch.tensor([2, 0]))
    with torch.no_grad():
        a, _ = full.response_logprobs(model)
        b, _ = mb.response_logprobs(model)
    assert torch.allclose(a[:, :3], b, atol=1e-5)


def test_online_state_round_trips_kl_moments_generator_and_step(tiny_model_dir):
    m = module(
        tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_target=1.0, normalize_rewards=True
    )
    m.kl_ctl.update(5.0, n_steps=1000)
    m.reward_moments.update(torch.tensor([1.0, 2.0, 4.0]))
    m.rollout_step = 7
    torch.rand(3, generator=m.generator)
    state = copy.deepcopy(m.online_state_dict())
    expected = torch.rand(4, generator=m.generator)

    other = module(
        tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_target=1.0, normalize_rewards=True
    )
    other.load_online_state_dict(state)
    assert other.kl_ctl.value == m.kl_ctl.value != 0.05
    assert other.reward_moments.state_dict() == m.reward_moments.state_dict()
    assert other.rollout_step == 7
    assert torch.equal(torch.rand(4, generator=other.generator), expected)


def test_sequence_logprobs_of_the_rollout_match_the_forward_helper(tiny_model_dir):
    """Guard on the contract the stages rely on: Rollout.response_logprobs == sequence_logprobs' tail."""
    m = module(tiny_model_dir, reward_functions=[f"{__name__}.count_great"], kl_coef=0.0)
    rollout = m.generate(prompt_batch(m.tokenizer))
    ids, mask, pos = rollout.sequences()
    with torch.no_grad():
        full, _ = sequence_logprobs(m.policy, ids, mask, pos)
        tail, _ = rollout.response_logprobs(m.policy)
    r = rollout.response_ids.shape[1]
    assert torch.allclose(full[:, -r:] * rollout.response_mask, tail, atol=1e-5)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"max_steps": 3}, "trainer.max_steps=3 is not supported"),
        ({"min_steps": 2}, "trainer.min_steps=2 is not supported"),
        ({"callbacks": "checkpoint"}, "ModelCheckpoint(every_n_train_steps=2) is not supported"),
    ],
)
def test_options_counting_optimiser_steps_are_rejected_with_the_alternative(
    tiny_model_dir, tmp_path, option, message
):
    """Under manual optimisation global_step counts every optimiser step; options counted in it are
    refused before any rollout, naming the option and the rollout-step alternative."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_rlhf.data import RLHFDataModule
    from lightning_rlhf.stages import PPOModule

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "review number {i}"}}\n' for i in range(4)))
    if option.get("callbacks") == "checkpoint":
        option = {"callbacks": [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)]}
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  max_epochs=1, **option)  # fmt: skip
    m = PPOModule(policy=str(tiny_model_dir), reward_functions=["lightning_rlhf.demo.rewards.gold_reward"],
                  generation={"max_new_tokens": 2}, log_samples_every_n_steps=0)  # fmt: skip
    with pytest.raises(ValueError) as err:
        t.fit(m, RLHFDataModule(str(prompts), batch_size=2))
    assert message in str(err.value)
    assert "rollout steps" in str(err.value)
    assert m.rollout_step == 0  # refused before any rollout


def test_rollout_steps_bound_the_run_while_global_step_counts_optimiser_steps(tiny_model_dir, tmp_path):
    """The supported way: limit_train_batches x max_epochs rollout steps; global_step is larger
    (2 rollout steps x 2 epochs x 2 mini-batches x actor and critic)."""
    import lightning as L

    from lightning_rlhf.data import RLHFDataModule
    from lightning_rlhf.stages import PPOModule

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "review number {i}"}}\n' for i in range(8)))
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, max_epochs=1, limit_train_batches=2)  # fmt: skip
    m = PPOModule(policy=str(tiny_model_dir), reward_functions=["lightning_rlhf.demo.rewards.gold_reward"],
                  generation={"max_new_tokens": 2}, ppo_epochs=2, mini_batch_size=2, critic_init="policy",
                  log_samples_every_n_steps=0)  # fmt: skip
    t.fit(m, RLHFDataModule(str(prompts), batch_size=4))
    assert m.rollout_step == 2
    assert t.global_step == 2 * 2 * 2 * 2
