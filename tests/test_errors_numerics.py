"""Non-finite losses/gradients skip the step (counted) or stop the run; exports and checkpoints never hold
NaN weights; exports are written atomically. Real Trainer runs of the tiny Llama."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.errors import NonFiniteError
from lightning_rlhf.stages import GRPOModule, PPOModule, SFTModule


class PoisonedSFT(SFTModule):
    """SFT whose loss is NaN on the chosen step (as a bad batch or an overflow would make it)."""

    poison_step = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == self.poison_step else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in self.policy.parameters()])


def fit(tiny_model_dir, memo_sft_file, tmp_path, nonfinite: str, steps: int = 3):
    module = PoisonedSFT(policy=str(tiny_model_dir), optim={"learning_rate": 1e-2, "nonfinite": nonfinite})
    module.snapshots = []
    dm = RLHFDataModule(str(memo_sft_file), kind="sft", batch_size=4, shuffle=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    return module, trainer


def test_a_nonfinite_step_is_skipped_and_counted(tiny_model_dir, memo_sft_file, tmp_path):
    module, trainer = fit(tiny_model_dir, memo_sft_file, tmp_path, "skip")
    s0, s1, s2 = module.snapshots
    assert all(torch.equal(a, b) for a, b in zip(s0, s1, strict=True))  # step 1 (NaN) changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(s1, s2, strict=True))  # step 2 trained again
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0


def test_a_nonfinite_step_stops_the_run_when_asked(tiny_model_dir, memo_sft_file, tmp_path):
    with pytest.raises(NonFiniteError, match=r"PoisonedSFT: non-finite loss at step 1 \(optim.nonfinite='stop'\)"):
        fit(tiny_model_dir, memo_sft_file, tmp_path, "stop")


def test_export_refuses_nan_weights_and_writes_atomically(tiny_model_dir, tmp_path):
    module = SFTModule(policy=str(tiny_model_dir))
    module.configure_model()
    out = tmp_path / "export"
    out.mkdir()
    (out / "fit_config.yaml").write_text("kept: true\n")
    module.save_pretrained(out)
    assert (out / "config.json").exists() and (out / "fit_config.yaml").read_text() == "kept: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(module.policy.parameters())[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="refusing to write an export to .* with non-finite weights: "):
        module.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == before  # the previous export is untouched
    with pytest.raises(NonFiniteError, match="a checkpoint with non-finite weights"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


# ------------------------------------------------------------------ online stages (PPO, GRPO)

POISON_STEP = 1  # the second rollout step (0-based), "rollout step 2" in messages


def inf_reward_fn(prompts, completions, **_):
    inf_reward_fn.calls += 1
    return [math.inf if inf_reward_fn.calls == 2 else 1.0 for _ in completions]


inf_reward_fn.calls = 0


def online(name: str, path: str, nonfinite: str, output_dir=None, **kw):
    optim = {"learning_rate": 1e-2, "scheduler": "constant", "nonfinite": nonfinite}
    kw = dict(reward_model=path, optim=optim, generation={"max_new_tokens": 4}, normalize_rewards=True,
              log_samples_every_n_steps=0, output_dir=output_dir, **kw)
    if name == "ppo":
        return PPOModule(policy=path, ppo_epochs=1, critic_optim={"learning_rate": 1e-2, "scheduler": "constant"}, **kw)
    return GRPOModule(policy=path, num_generations=2, num_iterations=1, **kw)


POISONED_LOSS = "test_errors_numerics_nan_ppo_clip"


class Poison(L.Callback):
    """At rollout step ``POISON_STEP``: the reward model scores inf (``"reward_model"``), or the policy loss
    is NaN (``"loss"``: ``core.ppo_policy_loss`` registered as ``POISONED_LOSS``, which the stage is
    given as its ``policy_loss``). Also records the weights and the Adam step counts before every
    rollout step and at the end."""

    def __init__(self, what: str):
        self.what, self.hook, self.snapshots, self.adam_steps = what, None, [], []
        if what == "loss":
            from lightning_rlhf.core import ppo_policy_loss, register_policy_loss

            def poisoned(*args, **kwargs):
                loss, stats = ppo_policy_loss(*args, **kwargs)
                return (loss * math.nan if self.module.rollout_step == POISON_STEP else loss), stats

            register_policy_loss(POISONED_LOSS, override=True)(poisoned)

    def _record(self, module):
        self.snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        self.adam_steps.append([float(s["step"]) for o in module.optimizer_list() for s in o.optimizer.state.values()])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.module = module
        self._record(module)
        if self.what == "reward_model" and module.rollout_step == POISON_STEP:
            # the score head's output: what the scorer reads (at each sequence's last real token)
            self.hook = module.reward_model.score.register_forward_hook(
                lambda _mod, _inp, out: torch.full_like(out, math.inf)
            )

    def on_train_batch_end(self, trainer, module, *args):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def on_train_end(self, trainer, module):
        self._record(module)


def fit_online(name, what, tiny_model_dir, prompt_file, tmp_path, monkeypatch, nonfinite, output_dir=None):
    poison = Poison(what)
    policy_loss = POISONED_LOSS if what == "loss" else "ppo_clip"
    module = online(name, str(tiny_model_dir), nonfinite, output_dir=output_dir, policy_loss=policy_loss)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, logger=False,  # 4 rollout steps
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[poison])
    trainer.fit(module, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    return module, trainer, poison


@pytest.mark.slow
@pytest.mark.parametrize("what", ["reward_model", "loss"])
@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_online_nonfinite_rollout_step_is_skipped_and_counted(name, what, tiny_model_dir, prompt_file, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "export"
    module, trainer, poison = fit_online(name, what, tiny_model_dir, prompt_file, tmp_path, monkeypatch, "skip", out)
    snaps, adam = poison.snapshots, poison.adam_steps
    assert len(snaps) == 5 and module.rollout_step == 4  # the run went on to the end

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(snaps[0], snaps[1])  # rollout step 1 trained
    assert same(snaps[1], snaps[2])  # the poisoned rollout step changed no weight (policy, critic)
    assert adam[2] == adam[1] and adam[1] and adam[3] != adam[2]  # nor the optimisers' state
    assert not same(snaps[2], snaps[3])  # and training went on
    assert all(bool(torch.isfinite(v).all()) for v in snaps[4].values() if v.is_floating_point())
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0
    moments = module.reward_moments.state_dict()
    rows = 2 * (1 + (name == "grpo"))  # rollout rows a step: 2 prompts, x2 generations for GRPO
    # the normaliser took in every step's scores but the inf ones
    assert all(math.isfinite(v) for v in moments.values()) and moments["count"] == rows * (3 if what == "reward_model" else 4)
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    assert exported and all(bool(torch.isfinite(v).all()) for v in exported.values())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "what", "message"), [
    ("ppo", "reward_model", r"PPOModule: non-finite rewards \(reward_model: inf at rows \[0, 1\] of 2\) at rollout step 2 "
                            r"\(optim.nonfinite='stop'\)"),
    ("grpo", "loss", r"GRPOModule: non-finite loss at rollout step 2 \(optim.nonfinite='stop'\)"),
])
def test_online_nonfinite_stops_the_run_when_asked(name, what, message, tiny_model_dir, prompt_file, tmp_path,
                                                   monkeypatch):
    with pytest.raises(NonFiniteError, match=message):
        fit_online(name, what, tiny_model_dir, prompt_file, tmp_path, monkeypatch, "stop")


@pytest.mark.slow
def test_a_reward_function_returning_inf_is_refused_in_a_run(tiny_model_dir, prompt_file, tmp_path):
    from lightning_rlhf.errors import RewardFunctionError

    inf_reward_fn.calls = 0
    module = GRPOModule(policy=str(tiny_model_dir), reward_functions=[f"{__name__}.inf_reward_fn"], num_generations=2,
                        generation={"max_new_tokens": 4}, log_samples_every_n_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RewardFunctionError, match="reward function 'inf_reward_fn' returned inf at position 0"):
        trainer.fit(module, RLHFDataModule(str(prompt_file), batch_size=2, shuffle=False))
    assert module.rollout_step == 1


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_online_export_and_checkpoint_refuse_nan_weights(name, tiny_model_dir, tmp_path):
    module = online(name, str(tiny_model_dir), "skip")
    module.configure_model()
    with torch.no_grad():
        next(module.policy.parameters())[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="refusing to write an export to .* with non-finite weights: "):
        module.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(NonFiniteError, match="a checkpoint with non-finite weights"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


AGREED_SCRIPT = """
import json, math, sys, torch, lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.core import ppo_policy_loss, register_policy_loss
from lightning_rlhf.stages import GRPOModule, PPOModule

kind, strategy, what, base, prompts = sys.argv[1:6]
L.seed_everything(0)


@register_policy_loss("nan_on_rank_1")
def poisoned(*args, **kwargs):  # rank 1 only, rollout step 1: its loss is NaN
    loss, stats = ppo_policy_loss(*args, **kwargs)
    return (loss * math.nan if what == "loss" and m.global_rank == 1 and m.rollout_step == 1 else loss), stats


common = dict(policy=base, reward_model=base, generation={"max_new_tokens": 4}, normalize_rewards=True,
              optim={"learning_rate": 1e-2, "scheduler": "constant"}, log_samples_every_n_steps=0,
              policy_loss="nan_on_rank_1")
m = PPOModule(ppo_epochs=1, **common) if kind == "ppo" else GRPOModule(num_generations=2, **common)
sums = []


class Poison(L.Callback):  # rank 1 only, rollout step 1: its reward model scores inf
    hook = None

    def on_train_batch_start(self, trainer, module, *args):
        if what == "reward_model" and trainer.global_rank == 1 and module.rollout_step == 1:
            self.hook = module.reward_model.score.register_forward_hook(lambda *a: torch.full_like(a[2], math.inf))

    def on_train_batch_end(self, trainer, module, *args):
        if self.hook is not None:
            self.hook.remove()
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.state_dict().values()]
        sums.append(f"{sum(float(p.detach().double().sum()) for p in full):.12e}")


strat = "ddp" if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
t = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_epochs=1, limit_train_batches=3, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Poison()])
t.fit(m, RLHFDataModule(prompts, batch_size=2))
with open(f"result-{t.global_rank}.json", "w") as f:
    json.dump({"sums": sums, "skipped": m.nonfinite_skipped}, f)
torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None  # as PyTorch asks: gloo can abort at exit
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("kind", "strategy", "what"), [("ppo", "fsdp2", "reward_model"), ("grpo", "ddp", "loss")])
def test_online_nonfinite_skip_is_agreed_across_ranks(kind, strategy, what, tiny_model_dir, tmp_path):
    """Only rank 1 sees the inf reward / NaN loss at rollout step 1: both ranks skip that step, count it, and
    end with the same weights. A rank deciding alone runs collectives the other does not (the reward
    normaliser's gather, FSDP2's forwards and clipping): gloo then fails or hangs (the timeout fails it),
    as this test does with the all-reduce of ``nonfinite_step`` removed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "run.py").write_text(AGREED_SCRIPT)
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    args = [sys.executable, "run.py", kind, strategy, what, str(tiny_model_dir),
            str(root / "data/demo/reviews/prompts_eval.jsonl")]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1))
    assert r0 == r1  # the same weights after every rollout step, the same count, on both ranks
    sums = r0["sums"]
    assert r0["skipped"] == 1 and sums[1] == sums[0] != sums[2]  # rollout step 1 skipped; step 2 trained
