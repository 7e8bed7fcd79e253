"""The Fabric runner (``lightning_rlhf.fabric``, ``lightning-rlhf fabric``): every stage trains under
Fabric exactly as under the Trainer; several processes (gloo) keep the ranks equal and match the
Trainer, PPO and GRPO with the data-dependent decisions the ranks must agree on (one rank's
responses stopping early, target_kl, dynamic sampling); a checkpoint resumes to the straight run.
Fabric against one process on the same global batch: test_distributed's
``test_two_processes_train_like_one_process_on_the_same_global_batch``.

Tolerances: one process, the same seeds and batches: the runner and the Trainer run the same
operations in the same order, so the weights agree to float32 round-off (atol 1e-6). Two processes
(DDP, FSDP2) against the Trainer's DDP: atol 1e-5, rtol 1e-4 (FSDP2's reduce-scatter sums in another
order). Ranks against each other: exactly equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "data/demo/reviews/pref_train.jsonl"
GOLD = "lightning_rlhf.demo.rewards.gold_reward"


def char_length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def _module(stage: str, policy: Path, out: Path, **extra):
    from lightning_rlhf.stages import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule

    optim = {"learning_rate": 1e-3, "warmup_steps": 1}
    online = dict(policy=str(policy), reward_functions=[GOLD], generation={"max_new_tokens": 6}, optim=optim,
                  output_dir=str(out), log_samples_every_n_steps=0, **extra)  # fmt: skip
    return {
        "sft": lambda: SFTModule(policy=str(policy), optim=optim, output_dir=str(out)),
        "reward": lambda: RewardModule(model=str(policy), optim=optim, output_dir=str(out)),
        "dpo": lambda: DPOModule(policy=str(policy), optim=optim, output_dir=str(out)),
        "ppo": lambda: PPOModule(critic_init="policy", ppo_epochs=2, mini_batch_size=2, kl_target=0.01, **online),
        # GRPO: a reward that differs within (almost) every group of two, so that every rollout trains
        "grpo": lambda: GRPOModule(num_generations=2, beta=0.1, kl_target=0.01,
                                   **online | {"reward_functions": [f"{__name__}.char_length"]}),
    }[stage]()


def _data(stage: str, sft_file: Path, prompt_file: Path):
    from lightning_rlhf.data import RLHFDataModule

    if stage == "sft":
        return RLHFDataModule(str(sft_file), batch_size=2)  # 4 batches: 3 steps stay in epoch 1
    if stage in ("reward", "dpo"):
        return RLHFDataModule(str(PREFS), batch_size=4, max_length=64, max_prompt_length=32)
    return RLHFDataModule(str(prompt_file), batch_size=2, max_prompt_length=32)


def _bounds(stage: str) -> dict:
    # online stages: 2 rollout steps (the Trainer refuses max_steps there); others: 3 optimiser steps
    return {"max_epochs": 1, "limit_train_batches": 2} if stage in ("ppo", "grpo") else {"max_steps": 3}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_one_process_fabric_run_equals_the_trainer_run(tmp_path, stage, tiny_model_dir, memo_sft_file, prompt_file):
    from lightning_rlhf.fabric import FabricRunner, build_fabric

    lightning.seed_everything(0)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                **_bounds(stage))  # fmt: skip
    trainer.fit(_module(stage, tiny_model_dir, tmp_path / "trainer"), _data(stage, memo_sft_file, prompt_file))

    lightning.seed_everything(0)
    module = _module(stage, tiny_model_dir, tmp_path / "fabric")
    runner = FabricRunner(build_fabric("cpu", 1), **_bounds(stage))
    runner.fit(module, _data(stage, memo_sft_file, prompt_file))
    assert runner.step == (2 if stage in ("ppo", "grpo") else 3)
    if stage in ("ppo", "grpo"):
        assert module.rollout_step == 2
        assert module.global_rank == 0 and module._fabric is not None

    by_trainer = load_file(tmp_path / "trainer" / "model.safetensors")
    by_fabric = load_file(tmp_path / "fabric" / "model.safetensors")
    assert by_trainer.keys() == by_fabric.keys()
    for name, w in by_trainer.items():
        torch.testing.assert_close(by_fabric[name], w, atol=1e-6, rtol=0, msg=name)
    init = load_file(tiny_model_dir / "model.safetensors")
    moved = [n for n, w in by_fabric.items() if n in init and not torch.allclose(w, init[n])]
    assert moved, "training did not change the weights"


@pytest.mark.slow
def test_checkpoint_and_resume_equal_a_straight_run(tmp_path, tiny_model_dir, prompt_file):
    """GRPO (extra state: rollout generator, KL controller, data position) under the runner: 1 rollout
    step, a checkpoint, a new process-like run resumed from it for the 2nd step, equals 2 steps straight."""
    from lightning_rlhf.fabric import FabricRunner, build_fabric

    def run(out, max_steps, ckpt_dir=None, ckpt_path=None):
        lightning.seed_everything(0)
        module = _module("grpo", tiny_model_dir, out, schedule_steps=2)  # the same LR schedule in all runs
        runner = FabricRunner(build_fabric("cpu", 1), max_steps=max_steps, max_epochs=1, checkpoint_dir=ckpt_dir)
        runner.fit(module, _data("grpo", None, prompt_file), ckpt_path=ckpt_path)
        return module, runner

    straight, _ = run(tmp_path / "straight", 2)
    first, _ = run(tmp_path / "first", 1, ckpt_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    resumed, runner = run(tmp_path / "resumed", 2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert runner.step == 2 and resumed.rollout_step == 2 and first.rollout_step == 1
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-6)
    assert first.kl_ctl.value != pytest.approx(straight.kl_ctl.value, rel=1e-9)  # the 2nd step moved it
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    c = load_file(tmp_path / "first" / "model.safetensors")
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.allclose(c[n], w) for n, w in a.items())  # the resumed step really trained


def test_unsupported_trainer_options_are_refused_with_a_message(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "lightning_rlhf", "fabric", "--config", str(ROOT / "configs/demo/sft.yaml"),
            "--trainer.logger", "false", "--trainer.gradient_clip_val", "0.5"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "trainer.gradient_clip_val=0.5 is not supported by `lightning-rlhf fabric`" in proc.stderr
    assert "optim.max_grad_norm" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_tensor_parallel_mesh_is_refused_with_a_message(tmp_path):
    """ModelParallelStrategy's default sizes (``auto``) make every process a tensor-parallel rank of
    one data-parallel rank; the stages shard over the data-parallel dimension only, so the ranks
    would each train a whole copy on the same batches, unsynchronised. Refused at set-up, naming the
    sizes to use (``build_fabric(strategy="fsdp2")`` sets them: see test_distributed)."""
    cfg = tmp_path / "tp.yaml"
    cfg.write_text("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "lightning_rlhf", "fabric", "--config", str(ROOT / "configs/demo/sft.yaml"),
            "--config", str(cfg), "--trainer.devices", "2", "--trainer.logger", "false", "--trainer.max_steps", "1",
            "--trainer.callbacks", "[]", "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
            "--model.init_args.output_dir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "tensor_parallel_size=2 (data_parallel_size=1)" in proc.stderr
    assert "set data_parallel_size: 2 and tensor_parallel_size: 1" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# Two processes (gloo) through `lightning-rlhf fabric`: each rank writes its weights after training.

RANK_SCRIPT = """
import json, os, sys, torch
from lightning_rlhf import fabric as F
from lightning_rlhf.cli import main

KEYS = ("train/epochs", "rollout/sampling_rounds", "rollout/groups", "rollout/response_len")
fit = F.FabricRunner.fit
def fit_and_record(self, module, datamodule, ckpt_path=None):
    metrics, forwards = {}, []
    log_dict, configure_model = module.log_dict, module.configure_model
    def record(values, *args, **kwargs):  # this rank's logged decisions, per rollout step
        for k in KEYS:
            if k in values:
                metrics.setdefault(k, []).append(round(float(values[k]), 3))
        return log_dict(values, *args, **kwargs)
    def configure_and_count():  # every forward of the policy (a collective under FSDP2)
        configure_model()
        if hasattr(module, "rollout_step") and not forwards:
            forwards.append(0)
            module.policy.register_forward_hook(lambda *a: forwards.append(1))
    module.log_dict, module.configure_model = record, configure_and_count
    fit(self, module, datamodule, ckpt_path)
    model = module.exported_model()
    # every rank's own copy: the full tensors under FSDP2 (gathered on each rank), the replicas under DDP
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    global rank
    rank = self.fabric.global_rank
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, os.path.join(os.environ["RANK_OUT"], f"weights-{rank}.pt"))
    with open(os.path.join(os.environ["RANK_OUT"], f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": module.global_rank, "world": self.fabric.world_size, "step": self.step,
                   "rollout_step": getattr(module, "rollout_step", None), "metrics": metrics,
                   "forwards": len(forwards)}, f)
F.FabricRunner.fit = fit_and_record
main(sys.argv[1:])
with open(os.path.join(os.environ["RANK_OUT"], f"rank-{rank}.json")) as f:
    record = json.load(f)
with open(os.path.join(os.environ["RANK_OUT"], f"rank-{rank}.json"), "w") as f:  # gloo can abort an exit with a live group
    json.dump({**record, "group_after_command": torch.distributed.is_initialized()}, f)
"""

FSDP2_YAML = (
    "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
    "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n"
)

LENGTH_REWARD = """
import torch.distributed as dist

from lightning_rlhf.stages import GRPOModule, PPOModule


def length(prompts, completions, **_):
    # signal in almost every group of a random model's samples, so every step has gradients
    return [float(len(c)) for c in completions]


def length_on_rank0(prompts, completions, **_):
    # rank 1: no group ever has signal (GRPO's dynamic sampling keeps none there)
    return [float(len(c)) if dist.get_rank() == 0 else 0.0 for c in completions]


class EarlyStopOnRank1:
    def eos_token_ids(self):
        # rank 1: every token ends a response, so its rows all stop after one token; rank 0's run on
        return list(range(len(self.tokenizer))) if self.global_rank == 1 else super().eos_token_ids()


class PPO(EarlyStopOnRank1, PPOModule):
    pass


class GRPO(EarlyStopOnRank1, GRPOModule):
    pass
"""

GRPO_YAML = """
seed_everything: 0
trainer: {{accelerator: cpu, devices: 2, max_epochs: 1, limit_train_batches: 2, logger: false}}
model:
  class_path: lightning_rlhf.stages.GRPOModule
  init_args:
    policy: {policy}
    reward_functions: [length_reward.length]
    num_generations: 2
    beta: 0.1
    kl_target: 0.01
    schedule_steps: 2             # the LR schedule's length whatever max_steps stops the run at
    micro_batch_size: 2
    generation: {{max_new_tokens: 8}}
    optim: {{learning_rate: 1.0e-3}}
    log_samples_every_n_steps: 0
data: {{train_files: {prompts}, batch_size: 2, max_prompt_length: 32}}
"""


def _run(tmp_path: Path, command: str, config: str, strategy: str, extra: list[str]) -> Path:
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    work = tmp_path / f"{command}-{strategy}"
    work.mkdir()
    (work / "run.py").write_text(RANK_SCRIPT)
    args = [sys.executable, str(work / "run.py") if command == "fabric" else "-m"]
    args += [] if command == "fabric" else ["lightning_rlhf"]
    args += [command, "--config", config, "--trainer.devices", "2", "--trainer.logger", "false",
             "--model.init_args.output_dir", str(work / "out")]  # fmt: skip
    if strategy == "fsdp2":
        (work / "fsdp2.yaml").write_text(FSDP2_YAML)
        args += ["--config", str(work / "fsdp2.yaml")]
    else:
        args += ["--trainer.strategy", "ddp"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{tmp_path}", RANK_OUT=str(work))
    proc = subprocess.run(args + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_two_processes_under_fabric_keep_ranks_equal_and_match_the_trainer(tmp_path, stage, tiny_model_dir):
    """DDP and FSDP2 under ``lightning-rlhf fabric``: after training both ranks hold the same weights
    (they trained on different batches, so the gradients were all-reduced: under DDP the online
    stages' backward inside training_step needs the reducer prepared), equal to the Trainer's DDP run
    on the same global batches."""
    offline = ["--trainer.max_steps", "3", "--data.batch_size", "8", "--trainer.callbacks", "[]",
               "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0"]  # fmt: skip
    if stage == "sft":
        config = str(ROOT / "configs/demo/sft.yaml")
        extra = offline + ["--model.init_args.policy.path", str(tiny_model_dir)]
    elif stage in ("reward", "dpo"):
        config = str(ROOT / f"configs/demo/{stage}.yaml")
        key = "model" if stage == "reward" else "policy"
        extra = offline + [f"--model.init_args.{key}.path", str(tiny_model_dir)]
    else:
        # the data-dependent decisions the ranks must agree on: rank 1's responses all stop after one
        # token while rank 0's run on (every forward and backward is matched, or FSDP2 hangs and the
        # timeout fails the test); PPO's target_kl stops both ranks' epochs after the first; GRPO's
        # dynamic sampling finds signal on rank 0 only (rank 1 trains with zero weight)
        config = str(tmp_path / f"{stage}.yaml")
        text = GRPO_YAML.format(policy=tiny_model_dir, prompts=ROOT / "data/demo/reviews/prompts_eval.jsonl")
        text = text.replace("lightning_rlhf.stages.GRPOModule", f"length_reward.{stage.upper()}")
        if stage == "ppo":
            text = text.replace("num_generations: 2", "critic_init: policy\n    target_kl: 1.0e-12")
            text = text.replace("beta: 0.1", "ppo_epochs: 2\n    mini_batch_size: 1\n    kl_coef: 0.1")
        else:
            text = text.replace("length_reward.length]", "length_reward.length_on_rank0]")
            text = text.replace("beta: 0.1", "beta: 0.1\n    dynamic_sampling: true\n    max_resample_rounds: 1")
        Path(config).write_text(text)
        extra = ["--trainer.enable_progress_bar", "false"]
    reference = load_file(_run(tmp_path, "fit", config, "ddp", extra) / "out" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert all(not torch.allclose(w, init[n]) for n, w in reference.items() if n in init)  # every weight trained
    for strategy in ("ddp", "fsdp2"):
        work = _run(tmp_path, "fabric", config, strategy, extra)
        ranks = [json.loads((work / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2  # the module sees Fabric's rank
        assert not any(r["group_after_command"] for r in ranks)  # the command destroyed its process groups
        if stage in ("ppo", "grpo"):
            assert ranks[0]["rollout_step"] == ranks[1]["rollout_step"] == 2
            assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0  # the same forwards on both ranks
            m0, m1 = ranks[0]["metrics"], ranks[1]["metrics"]
            assert m1["rollout/response_len"] == [1.0, 1.0]  # rank 1 stopped after one token ...
            assert all(v > 1.0 for v in m0["rollout/response_len"])  # ... rank 0 did not
            if stage == "ppo":
                assert m0["train/epochs"] == m1["train/epochs"] == [1.0, 1.0]  # target_kl: 1 of 2 epochs
            else:
                assert m0["rollout/sampling_rounds"] == m1["rollout/sampling_rounds"] == [2.0, 2.0]  # 1 + 1 more
                assert m1["rollout/groups"] == [0.0, 0.0] and all(v > 0 for v in m0["rollout/groups"])
        w0, w1 = (torch.load(work / f"weights-{r}.pt") for r in (0, 1))
        for name, w in w0.items():
            assert torch.equal(w, w1[name]), f"{strategy}: ranks differ on {name}"
        exported = load_file(work / "out" / "model.safetensors")  # rank 0's consolidated export
        for name, w in reference.items():
            torch.testing.assert_close(exported[name], w, atol=1e-5, rtol=1e-4, msg=f"{strategy} {name}")
            torch.testing.assert_close(w0[name], w, atol=1e-5, rtol=1e-4, msg=f"{strategy} {name}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_fabric_checkpoint_resumes_to_the_straight_run(tmp_path, tiny_model_dir):
    """GRPO under FSDP2 through ``lightning-rlhf fabric``: 1 rollout step and a distributed checkpoint
    (a folder of shards), then a new run resumed from it for the 2nd step, equals 2 steps straight
    (each rank's rollout generator, the KL controller and the data position come back)."""
    config = tmp_path / "grpo.yaml"
    config.write_text(GRPO_YAML.format(policy=tiny_model_dir, prompts=ROOT / "data/demo/reviews/prompts_eval.jsonl"))
    (tmp_path / "straight").mkdir()
    straight = _run(tmp_path / "straight", "fabric", str(config), "fsdp2", ["--trainer.max_steps", "2"])
    (tmp_path / "first").mkdir()
    ckpt = tmp_path / "ckpt"
    _run(tmp_path / "first", "fabric", str(config), "fsdp2", ["--trainer.max_steps", "1", "--checkpoint_dir", str(ckpt)])
    assert (ckpt / "last.ckpt").is_dir()  # sharded: a distributed-checkpoint folder
    first = torch.load(tmp_path / "first" / "fabric-fsdp2" / "weights-0.pt")
    (tmp_path / "resumed").mkdir()
    resumed = _run(tmp_path / "resumed", "fabric", str(config), "fsdp2",
                   ["--trainer.max_steps", "2", "--ckpt_path", str(ckpt / "last.ckpt")])  # fmt: skip
    for rank in (0, 1):
        r = json.loads((resumed / f"rank-{rank}.json").read_text())
        assert r["step"] == 2 and r["rollout_step"] == 2
        a = torch.load(straight / f"weights-{rank}.pt")
        b = torch.load(resumed / f"weights-{rank}.pt")
        for name, w in a.items():
            torch.testing.assert_close(b[name], w, atol=1e-6, rtol=0, msg=f"rank {rank} {name}")
    assert any(not torch.allclose(first[n], w) for n, w in a.items())  # the resumed step really trained
