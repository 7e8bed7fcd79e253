"""Checkpoints: every stage loads back with ``load_from_checkpoint``; an offline stage resumed mid-epoch
continues bit for bit on CPU (N steps straight == N/2, resume, N/2: the data loader position is saved)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.stages import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule

pytestmark = pytest.mark.slow

PAIRS = [{"prompt": f"review the {x} .", "chosen": f" the {x} is great .", "rejected": f" the {x} is bad ."}
         for x in ("phone", "lamp", "bag", "chair", "watch", "kettle", "camera", "laptop")]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_jsonl, memo_sft_file, prompt_file):
    pairs = write_jsonl(tmp_path_factory.mktemp("resume") / "pairs.jsonl", PAIRS)
    return {"sft": memo_sft_file, "preference": pairs, "prompt": prompt_file}


def build(name: str, path: str):
    optim = {"learning_rate": 1e-2, "scheduler": "constant"}
    gen = {"max_new_tokens": 4}
    return {
        "sft": lambda: SFTModule(policy=path, optim=optim),
        "reward": lambda: RewardModule(model=path, optim=optim),
        "dpo": lambda: DPOModule(policy=path, optim=optim),
        "ppo": lambda: PPOModule(policy=path, reward_functions=[f"{__name__}.length_reward"], optim=optim,
                                 generation=gen, log_samples_every_n_steps=0),
        "grpo": lambda: GRPOModule(policy=path, reward_functions=[f"{__name__}.length_reward"], optim=optim,
                                   generation=gen, num_generations=2, beta=0.04, log_samples_every_n_steps=0),
    }[name]()


def trainer(tmp_path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 1)
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.parametrize("name", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_every_stage_loads_from_its_checkpoint(name, tiny_model_dir, files, tmp_path):
    module = build(name, str(tiny_model_dir))
    dm = RLHFDataModule(str(files[module.data_kind]), batch_size=2, shuffle=False)
    # one batch; online stages refuse max_steps (it counts every optimiser step, not rollout steps)
    t = trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=1)
    t.fit(module, dm)
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    loaded = type(module).load_from_checkpoint(ckpt, weights_only=True)  # builds the models, loads the weights
    assert type(loaded.optim) is type(module.optim) and loaded.optim == module.optim
    trained = module.exported_model().state_dict()
    for key, value in loaded.exported_model().state_dict().items():
        assert torch.equal(value, trained[key]), key


class StopAt(L.Callback):
    """Save a checkpoint to ``path`` after ``step`` steps and stop, as a pre-empted job would. The checkpoint
    is saved inside the loop (where ModelCheckpoint and SaveOnSigterm save): one saved by
    ``trainer.save_checkpoint`` after ``fit`` returns on ``should_stop`` records the epoch as finished, so its
    resume would start the next epoch. ``rollout``: count rollout steps (PPO/GRPO: global_step counts every
    optimiser step there) instead of optimiser steps."""

    def __init__(self, step: int, path, rollout: bool = False):
        self.step, self.path, self.rollout = step, path, rollout

    def on_train_batch_end(self, trainer, module, *args):
        if (module.rollout_step if self.rollout else trainer.global_step) == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _run(name, tiny_model_dir, files, tmp_path, ckpt_path=None, save_to=None, stop_at=None):
    L.seed_everything(0)
    module = build(name, str(tiny_model_dir))
    module.optim.warmup_steps = 2  # a schedule that moves, so the scheduler's state matters too
    module.optim.scheduler = "cosine"
    dm = RLHFDataModule(str(files[module.data_kind]), batch_size=2, shuffle=True, seed=3)
    t = trainer(tmp_path, max_steps=6, max_epochs=10, callbacks=[StopAt(stop_at, save_to)] if stop_at else [])
    t.fit(module, dm, ckpt_path=ckpt_path)
    return module, t


@pytest.mark.parametrize("name", ["sft", "reward", "dpo"])
@pytest.mark.parametrize("split", [2, 4, 5], ids=["mid_epoch_1", "epoch_end", "mid_epoch_2"])
def test_resume_mid_epoch_is_bit_exact(name, split, tiny_model_dir, files, tmp_path):
    """8 records, batch 2: 4 batches an epoch; 6 steps straight == `split` steps, resume, the rest. Split 4
    saves at the epoch's last batch: the resumed run starts the next epoch with its own order (it used to
    replay an empty epoch and end one epoch later)."""
    straight, straight_t = _run(name, tiny_model_dir, files, tmp_path / "a")
    ckpt = tmp_path / "half.ckpt"
    half_module, half = _run(name, tiny_model_dir, files, tmp_path / "b", save_to=ckpt, stop_at=split)
    assert half.global_step == split
    resumed, t = _run(name, tiny_model_dir, files, tmp_path / "c", ckpt_path=ckpt)
    assert t.global_step == 6 and t.current_epoch == straight_t.current_epoch
    a, b = straight.exported_model().state_dict(), resumed.exported_model().state_dict()
    assert any(not torch.equal(v, half_v) for v, half_v in zip(a.values(), half_module.exported_model().state_dict().values(),
                                                                strict=True))  # the second half trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mid_epoch_resume_has_no_not_resumable_notice(tiny_model_dir, files, tmp_path):
    """Lightning warns "your dataloader is not resumable" on a mid-epoch resume unless the train loader is
    stateful (``state_dict``/``load_state_dict``). Ours is: the position sits with Lightning's loop state in
    the checkpoint (not in the data module's), and the resumed run gets no such notice."""
    ckpt = tmp_path / "half.ckpt"
    _run("sft", tiny_model_dir, files, tmp_path / "b", save_to=ckpt, stop_at=2)
    saved = torch.load(ckpt, weights_only=False)
    [position] = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["consumed"] == 2 and position["epoch_rng"] is not None
    assert "RLHFDataModule" not in saved  # one place for the position
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t = _run("sft", tiny_model_dir, files, tmp_path / "c", ckpt_path=ckpt)
    assert t.global_step == 6
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not resumable" in m], messages


PROMPTS = [{"prompt": [{"role": "user", "content": f"write about the {x} ."}]}
           for x in ("phone", "lamp", "bag", "chair", "watch", "kettle", "camera", "laptop")]


def build_online(name: str, path: str):
    """PPO/GRPO with every piece of state that the checkpoint must carry in play: the adaptive KL
    controller, the running reward normaliser, a moving LR schedule, shuffled mini-batches and sampling
    (the rollout generator)."""
    optim = {"learning_rate": 1e-2, "scheduler": "cosine", "warmup_steps": 2}
    gen = {"max_new_tokens": 4}
    common = dict(reward_functions=[f"{__name__}.length_reward"], optim=optim, generation=gen,
                  normalize_rewards=True, kl_target=0.01, kl_horizon=10, log_samples_every_n_steps=0)
    if name == "ppo":
        return PPOModule(policy=path, kl_coef=0.2, mini_batch_size=1, ppo_epochs=2, **common)
    return GRPOModule(policy=path, num_generations=2, beta=0.2, mini_batch_size=2, num_iterations=2, **common)


def _run_online(name, tiny_model_dir, prompts, tmp_path, ckpt_path=None, save_to=None, stop_at=None):
    """Fit 2 epochs of 3 rollout steps (8 prompts, 2 a batch: 4 batches an epoch, 3 taken); with ``stop_at``,
    save a checkpoint to ``save_to`` after that many rollout steps and stop."""
    L.seed_everything(0)
    module = build_online(name, str(tiny_model_dir))
    dm = RLHFDataModule(str(prompts), batch_size=2, shuffle=True, seed=3)
    t = trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=3,
                callbacks=[StopAt(stop_at, save_to, rollout=True)] if stop_at else [])
    t.fit(module, dm, ckpt_path=ckpt_path)
    return module, t


def _online_state(module) -> dict:
    opts = module.optimizer_list()
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "optimisers": [o.optimizer.state_dict() if hasattr(o, "optimizer") else o.state_dict() for o in opts],
        "schedulers": [s.state_dict() for s in module.schedulers()],
        "kl_coef": module.kl_ctl.value,
        "reward_moments": module.reward_moments.state_dict(),
        "generator": module.generator.get_state(),
        "rollout_step": module.rollout_step,
    }


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, write_jsonl):
    return write_jsonl(tmp_path_factory.mktemp("resume_online") / "prompts.jsonl", PROMPTS)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
@pytest.mark.parametrize("split", [2, 3, 4], ids=["mid_epoch_1", "epoch_end", "mid_epoch_2"])
def test_online_resume_mid_epoch_is_bit_exact(name, split, tiny_model_dir, prompts, tmp_path):
    """6 rollout steps straight == `split` rollout steps, checkpoint, resume, the rest: weights, optimisers,
    schedules, KL controller, reward normaliser, rollout generator and the data position, bit for bit. Split 3
    saves at the end of an epoch cut by limit_train_batches (Lightning then does not restore loader states)."""
    straight, _ = _run_online(name, tiny_model_dir, prompts, tmp_path / "a")
    assert straight.rollout_step == 6
    ckpt = tmp_path / "half.ckpt"
    half, _ = _run_online(name, tiny_model_dir, prompts, tmp_path / "b", save_to=ckpt, stop_at=split)
    assert half.rollout_step == split
    half_state = _online_state(half)
    resumed, _ = _run_online(name, tiny_model_dir, prompts, tmp_path / "c", ckpt_path=ckpt)
    a, b = _online_state(straight), _online_state(resumed)
    assert a["kl_coef"] != 0.2 and a["reward_moments"]["count"] > 0  # the state under test moved
    assert any(not torch.equal(v, half_state["weights"][k]) for k, v in a["weights"].items())  # 2nd half trained
    _assert_same(a, b)
