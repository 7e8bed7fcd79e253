"""PPOModule on tiny real models under Trainer, LightningCLI's parser and Fabric."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec
from lightning_rlhf.rollout import Experience, Rollout
from lightning_rlhf.stages import GenerationSpec, PPOModule
from lightning_rlhf.stages.common import OptimSpec

GREAT = f"{__name__}.great_fraction"


def great_fraction(prompts, completions, **_):
    """Test reward: the share of a response's words that are 'great' (a token the policy can learn)."""
    return [c.split().count("great") / max(1, len(c.split())) for c in completions]


def ppo(policy_dir, **kw) -> PPOModule:
    kw.setdefault("generation", GenerationSpec(max_new_tokens=6))
    kw.setdefault("optim", OptimSpec(learning_rate=1e-3, scheduler="constant"))
    kw.setdefault("critic_optim", OptimSpec(learning_rate=1e-3, scheduler="constant"))
    kw.setdefault("ppo_epochs", 2)
    kw.setdefault("mini_batch_size", 2)
    kw.setdefault("log_samples_every_n_steps", 0)
    return PPOModule(policy=policy_dir if isinstance(policy_dir, ModelSpec) else str(policy_dir), **kw)


def data(prompt_file, batch_size=2) -> RLHFDataModule:
    return RLHFDataModule(str(prompt_file), batch_size=batch_size, shuffle=False)


def trainer(batches: int, epochs: int = 1, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=batches, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_updates_policy_and_critic_and_leaves_frozen_models_untouched(
    tiny_model_dir, rm_dir, prompt_file
):
    m = ppo(tiny_model_dir, reward_model=str(rm_dir))
    m.configure_model()
    before = {name: snapshot(getattr(m, name)) for name in ("policy", "critic")}
    frozen_before = {"reference": snapshot(m.reference), "reward": snapshot(m.reward_model)}
    t = trainer(1)
    t.fit(m, data(prompt_file))
    for name in ("policy", "critic"):
        model = getattr(m, name)
        for pname, p in model.named_parameters():
            assert not torch.equal(p, before[name][pname]), f"{name}.{pname} did not change"
    for name, model in (("reference", m.reference), ("reward", m.reward_model)):
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen_before[name].items()), f"{name} changed"
    assert not any(k.startswith(("reference", "reward", "_frozen")) for k in m.state_dict())
    metrics = t.callback_metrics
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/kl", "rollout/kl_coef", "rollout/response_len",
                "rollout/truncated_frac", "train/policy_loss", "train/value_loss", "train/clipfrac",
                "train/approx_kl", "train/entropy", "train/explained_variance", "train/lr_actor",
                "train/lr_critic", "time/generate", "time/score", "time/train"):  # fmt: skip
        assert key in metrics, key
    # the critic was initialised from the reward model (InstructGPT): same backbone weights before training
    assert torch.equal(
        before["critic"]["model.embed_tokens.weight"], frozen_before["reward"]["model.embed_tokens.weight"]
    )


def test_tokens_after_eos_get_no_gradient(tiny_model_dir, rm_dir):
    m = ppo(tiny_model_dir, reward_model=str(rm_dir))
    m.configure_model()
    eos, pad = m.tokenizer.eos_token_id, m.tokenizer.pad_token_id
    great = m.tokenizer.convert_tokens_to_ids("great")
    rollout = Rollout(
        prompt_ids=torch.tensor([[pad, 10, 11], [12, 13, 14]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[great, eos, pad, pad], [great, great, great, great]]),
        response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),  # row 0 stops at its EOS
        logprobs=torch.zeros(2, 4),
        finished=torch.tensor([True, False]),
        prompt_index=torch.tensor([0, 1]),
    )
    old_logprobs, old_values = m.old_logprobs_and_values(rollout)
    g = torch.Generator().manual_seed(0)
    advantages, returns = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    captured = {}

    def keep(name):
        def hook(_module, _inp, out):
            out.retain_grad()
            captured[name] = out

        return hook

    h1 = m.policy.lm_head.register_forward_hook(keep("logits"))
    h2 = m.critic.score.register_forward_hook(keep("values"))
    try:
        exp = Experience(rollout, old_logprobs=old_logprobs, values=old_values, advantages=advantages, returns=returns)
        loss, _ = m.ppo_loss(exp.select(torch.tensor([0, 1])))
        loss.backward()
    finally:
        h1.remove()
        h2.remove()
    # lm_head ran on the last R+1 positions: column j predicts response token j
    logits_grad = captured["logits"].grad  # (2, 5, V)
    assert logits_grad[0, 2:].abs().max() == 0  # after row 0's EOS: no gradient at all
    assert logits_grad[0, :2].abs().max() > 0 and logits_grad[1, :4].abs().max() > 0
    values_grad = captured["values"].grad[:, -5:-1, 0]  # (2, 4): the value read for response token j
    assert values_grad[0, 2:].abs().max() == 0
    assert values_grad[0, :2].abs().max() > 0


def test_resume_continues_exactly(tiny_model_dir, rm_dir, prompt_file, tmp_path):
    kw = dict(reward_model=str(rm_dir), kl_coef=0.2, kl_target=0.01, kl_horizon=10, normalize_rewards=True)
    straight = ppo(tiny_model_dir, **kw)
    trainer(1, epochs=2).fit(straight, data(prompt_file))

    first = ppo(tiny_model_dir, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(1, epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(first, data(prompt_file))
    saved_kl = first.kl_ctl.value
    assert saved_kl != 0.2  # the adaptive controller moved

    resumed = ppo(tiny_model_dir, **kw)
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            seen["kl"] = module.kl_ctl.value
            seen["exp_avg"] = [copy.deepcopy(o.optimizer.state) for o in module.optimizer_list()]

    trainer(1, epochs=2, callbacks=[Spy()]).fit(
        resumed, data(prompt_file), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert seen["kl"] == saved_kl
    assert all(len(state) > 0 for state in seen["exp_avg"])  # Adam moments restored, not fresh
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert resumed.reward_moments.state_dict() == straight.reward_moments.state_dict()
    assert resumed.rollout_step == straight.rollout_step == 2
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_reward_function_instead_of_a_reward_model(tiny_model_dir, prompt_file, tmp_path):
    m = ppo(
        tiny_model_dir, reward_functions=[GREAT], critic_init="reward_model", save_every_n_steps=1,
        output_dir=str(tmp_path),
    )  # fmt: skip
    t = trainer(1)
    t.fit(m, data(prompt_file))
    assert m.reward_model is None and m.critic is not None  # critic fell back to the policy's folder
    assert "rollout/reward/great_fraction" in t.callback_metrics
    assert (tmp_path / "step-1" / "config.json").exists() and (tmp_path / "config.json").exists()


def char_length(prompts, completions, **_):
    """A reward that is not 0 whatever was sampled (the value head then always has a target to fit)."""
    return [float(len(c)) for c in completions]


def test_shared_backbone_critic_is_a_value_head_on_the_policy(tiny_model_dir, prompt_file):
    m = ppo(tiny_model_dir, reward_functions=[f"{__name__}.char_length"], share_backbone=True, vf_coef=0.5)
    m.configure_model()
    head = snapshot(m.value_head)
    policy = snapshot(m.policy)
    trainer(1).fit(m, data(prompt_file))
    assert m.critic is None
    assert any(not torch.equal(v, head[k]) for k, v in m.value_head.state_dict().items())
    assert any(not torch.equal(v, policy[k]) for k, v in m.policy.state_dict().items())
    assert any(k.startswith("value_head.") for k in m.state_dict())


def test_lora_policy_with_gradient_checkpointing_trains_only_adapters(tiny_model_dir, rm_dir, prompt_file):
    policy = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8), gradient_checkpointing=True)
    m = ppo(policy, reward_model=str(rm_dir))
    m.configure_model()
    assert m.reference is None and m.reference_is_adapter_off
    layer = m.policy.get_base_model().model.layers[0]
    calls = {"n": 0}
    checkpoint_fn = layer._gradient_checkpointing_func

    def counting(*args, **kwargs):
        calls["n"] += 1
        return checkpoint_fn(*args, **kwargs)

    layer._gradient_checkpointing_func = counting
    dm = data(prompt_file)
    dm.tokenizer = str(tiny_model_dir)
    dm.kind = "prompt"
    dm.setup("fit")
    m.generate(next(iter(dm.train_dataloader())))
    assert calls["n"] == 0  # generation runs in eval mode: no checkpointing, KV cache on
    before = snapshot(m.policy)
    trainer(1).fit(m, data(prompt_file))
    assert calls["n"] > 0  # the optimisation phase checkpoints
    after = m.policy.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all("lora_" in k for k in changed)


def test_micro_batches_accumulate_to_the_mini_batch_gradient(tiny_model_dir, rm_dir, prompt_file):
    results = []
    for micro in (None, 1):
        m = ppo(
            tiny_model_dir, reward_model=str(rm_dir), mini_batch_size=4, micro_batch_size=micro, ppo_epochs=1
        )
        trainer(1).fit(m, data(prompt_file, batch_size=4))
        results.append(snapshot(m))
    for k, v in results[0].items():
        assert torch.allclose(v, results[1][k], atol=1e-5, rtol=1e-4), k


def test_target_kl_stops_the_epochs_early(tiny_model_dir, prompt_file):
    m = ppo(tiny_model_dir, reward_functions=[GREAT], ppo_epochs=4, target_kl=-1.0)
    t = trainer(1)
    t.fit(m, data(prompt_file))
    assert float(t.callback_metrics["train/epochs"]) == 1.0


def test_fabric_loop_drives_the_same_module(tiny_model_dir, prompt_file, tmp_path):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module = ppo(tiny_model_dir, reward_functions=[GREAT], schedule_steps=2, output_dir=str(tmp_path / "out"))
    with fabric.init_module():
        module.configure_model()
    before = snapshot(module.policy)
    optimizers, _ = module.configure_optimizers()
    model, *optimizers = fabric.setup(module, *optimizers)
    dm = RLHFDataModule(str(prompt_file), kind="prompt", tokenizer=str(tiny_model_dir), batch_size=2)
    dm.setup("fit")
    for i, batch in enumerate(dm.train_dataloader()):
        model.training_step(fabric.to_device(batch), i)
    assert module.rollout_step == 2
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert module.schedulers()[0].last_epoch == 2
    module.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_reward_rises_on_a_tiny_problem(tiny_model_dir, prompt_file):
    m = ppo(
        tiny_model_dir,
        reward_functions=[GREAT],
        kl_coef=0.0,
        generation=GenerationSpec(max_new_tokens=4, num_samples=4),
        optim=OptimSpec(learning_rate=3e-3, scheduler="constant"),
        ppo_epochs=4,
        mini_batch_size=8,
        vf_coef=0.5,
        share_backbone=True,
    )
    rewards = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            rewards.append(float(trainer.callback_metrics["rollout/reward_mean"]))

    trainer(1, epochs=25, callbacks=[Record()]).fit(m, data(prompt_file, batch_size=4))
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.3, rewards


def test_demo_config_parses_with_the_cli(repo_root, tiny_model_dir, rm_dir):
    from lightning_rlhf.cli import cli_main

    cli = cli_main(
        [
            "--config", str(repo_root / "configs/demo/ppo.yaml"),
            "--model.init_args.policy.path", str(tiny_model_dir),
            "--model.init_args.reward_model", str(rm_dir),
            "--trainer.logger", "false",
        ],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.model, PPOModule)
    assert cli.model.diagnostic_functions == ["lightning_rlhf.demo.rewards.gold_reward"]
