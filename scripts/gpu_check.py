"""Run every stage briefly on one device and print one line per check: PASS/FAIL/SKIP + seconds.

    python scripts/gpu_check.py                  # CUDA, bf16-mixed (what scripts/gpu_check.sh runs)
    python scripts/gpu_check.py --device cpu     # the same checks on the CPU (CI's dry run)

Each check is a real ``lightning.Trainer`` run of a stage module on the demo task with the demo's tiny
Llama (built from its shipped config, no downloads), a couple of steps long: SFT (full, LoRA, QLoRA),
the reward model, DPO with LoRA, PPO with the evaluation callback, GRPO, PPO under ``bf16-true``
(the frozen reference and reward model must be converted) and under ``16-mixed`` (gradients
unscaled before clipping), then the pipeline's evaluation of the trained models, and ``lightning-rlhf pipeline`` (SFT then DPO, a
few steps each, then its evaluation). The stages are
driven from Python, so neither ``jsonargparse`` nor ``wandb`` is needed; the CLI pipeline runs
when jsonargparse and wandb are importable. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

DATA = ROOT / "data" / "demo" / "reviews"
GOLD = "lightning_rlhf.demo.rewards.gold_reward"


class Skip(Exception):
    """A check that cannot run here (missing package, no CUDA): printed as SKIP with the reason."""


class DeviceProbe(L.Callback):
    """Where the trained model and the frozen models sit *during* training (Lightning moves the module
    back to the CPU when fit ends, so looking after ``fit`` proves nothing)."""

    def __init__(self):
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        models = [pl_module.exported_model(), *getattr(pl_module, "_frozen", {}).values()]
        self.seen |= {p.device.type for m in models for p in m.parameters()}


def trainer(args, **kw) -> L.Trainer:
    kw.setdefault("precision", args.precision)
    kw["callbacks"] = [*kw.get("callbacks", []), DeviceProbe()]
    return L.Trainer(
        accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def data(kind: str, files: Path | str, tokenizer, batch_size: int = 4):
    from lightning_rlhf.data import RLHFDataModule

    return RLHFDataModule(
        train_files=str(files), kind=kind, tokenizer=tokenizer, batch_size=batch_size, max_length=64,
        max_prompt_length=32,
    )  # fmt: skip


def lora():
    from lightning_rlhf.models import LoraSpec

    return LoraSpec(r=8, alpha=16, target_modules="all-linear")


def evaluation_callback():
    from lightning_rlhf.evaluation import PolicyEvaluation, SamplingSpec

    return PolicyEvaluation(
        prompt_files=str(DATA / "prompts_eval.jsonl"), gold=[GOLD], loss_files=str(DATA / "sft_val.jsonl"),
        sampling=SamplingSpec(num_samples=2, max_new_tokens=8), max_prompts=4,
    )  # fmt: skip


def check_device(module) -> None:
    """During training, the trained model and every frozen model sat on the requested device, and only
    there (a silent CPU fallback or a model left behind is a failure)."""
    probe = next(c for c in module.trainer.callbacks if isinstance(c, DeviceProbe))
    want = module.trainer.strategy.root_device.type
    if probe.seen != {want}:
        raise AssertionError(f"parameters on {sorted(probe.seen) or 'nothing (no step ran)'} during training, expected {want}")


def run_checks(args, work: Path) -> dict[str, str]:
    from lightning_rlhf.demo.assets import base_model_dir
    from lightning_rlhf.models import ModelSpec
    from lightning_rlhf.stages import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
    from lightning_rlhf.stages.common import OptimSpec

    base = str(base_model_dir())
    optim = OptimSpec(learning_rate=1e-3, scheduler="constant")
    steps = dict(max_steps=args.steps)
    rollouts = dict(max_epochs=1, limit_train_batches=args.steps)
    out = {"sft": work / "sft", "reward": work / "reward", "ppo": work / "ppo", "dpo": work / "dpo"}

    def sft_full():
        m = SFTModule(ModelSpec(path=base), optim=optim, output_dir=str(out["sft"]))
        cb = evaluation_callback()
        t = trainer(args, callbacks=[cb], **steps)
        t.fit(m, datamodule=data("sft", DATA / "sft_train.jsonl", m.tokenizer))
        check_device(m)
        if set(cb.results) != {"before", "after"}:
            raise AssertionError(f"evaluation callback results: {sorted(cb.results)}")

    def sft_lora():
        m = SFTModule(ModelSpec(path=base, lora=lora(), gradient_checkpointing=True), optim=optim)
        trainer(args, **steps).fit(m, datamodule=data("sft", DATA / "sft_train.jsonl", m.tokenizer))
        check_device(m)

    def sft_qlora():
        if args.device != "cuda":
            raise Skip("QLoRA (bitsandbytes 4-bit) is checked on CUDA only")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes is not installed (pip install bitsandbytes, or put its wheel in wheels/)")
        m = SFTModule(ModelSpec(path=base, lora=lora(), quantization="4bit", dtype="bfloat16"), optim=optim)
        trainer(args, **steps).fit(m, datamodule=data("sft", DATA / "sft_train.jsonl", m.tokenizer))
        check_device(m)

    def reward():
        m = RewardModule(ModelSpec(path=str(out["sft"])), optim=optim, output_dir=str(out["reward"]))
        trainer(args, **steps).fit(m, datamodule=data("preference", DATA / "pref_train.jsonl", m.tokenizer))
        check_device(m)

    def dpo():
        m = DPOModule(ModelSpec(path=str(out["sft"]), lora=lora()), optim=optim, output_dir=str(out["dpo"]))
        trainer(args, **steps).fit(m, datamodule=data("preference", DATA / "pref_train.jsonl", m.tokenizer))
        check_device(m)

    def ppo(precision=None, name="ppo", policy_lora=True):
        def run():
            m = PPOModule(
                ModelSpec(path=str(out["sft"]), lora=lora() if policy_lora else None),
                reward_model=str(out["reward"]), diagnostic_functions=[GOLD], kl_coef=0.1,
                generation={"max_new_tokens": 8}, ppo_epochs=1, mini_batch_size=4, optim=optim,
                output_dir=str(out["ppo"]) if name == "ppo" else None,
            )  # fmt: skip
            callbacks = [evaluation_callback()] if name == "ppo" else []
            t = trainer(args, callbacks=callbacks, **rollouts, **({"precision": precision} if precision else {}))
            t.fit(m, datamodule=data("prompt", DATA / "prompts_train.jsonl", m.tokenizer))
            check_device(m)
            if precision == "bf16-true":  # the frozen models are converted with the policy
                dtypes = {n: next(f.parameters()).dtype for n, f in m._frozen.items()}
                if set(dtypes.values()) != {torch.bfloat16}:
                    raise AssertionError(f"frozen models under bf16-true: {dtypes}")

        return run

    def grpo():
        m = GRPOModule(
            ModelSpec(path=str(out["sft"]), lora=lora()), reward_model=str(out["reward"]), num_generations=4,
            generation={"max_new_tokens": 8}, optim=optim,
        )  # fmt: skip
        trainer(args, **rollouts).fit(m, datamodule=data("prompt", DATA / "prompts_train.jsonl", m.tokenizer, 2))
        check_device(m)

    def fp16_mixed():
        if args.device != "cuda":
            raise Skip("16-mixed (GradScaler) is checked on CUDA only")
        ppo("16-mixed", "ppo-16-mixed")()

    def bf16_true():
        if args.device == "cuda" and not torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bfloat16")
        ppo("bf16-true", "ppo-bf16-true", policy_lora=False)()

    def pipeline_evaluation():
        from lightning_rlhf.evaluation import SamplingSpec
        from lightning_rlhf.pipeline import EvalSpec, evaluate_models

        spec = EvalSpec(
            prompt_files=str(DATA / "prompts_eval.jsonl"), gold=[GOLD],
            models={"sft": "sft", "ppo": "ppo", "dpo": "dpo"}, reference="sft", reward_model="reward",
            reward_pairs=str(DATA / "pref_val.jsonl"), sampling=SamplingSpec(num_samples=2, max_new_tokens=8),
            max_prompts=4,
        )  # fmt: skip
        report = evaluate_models(spec, work)
        if set(report["models"]) != {"sft", "ppo", "dpo"}:
            raise AssertionError(f"evaluated: {sorted(report['models'])}")

    def pipeline_cli():
        missing = [m for m in ("jsonargparse", "wandb") if importlib.util.find_spec(m) is None]
        if missing:  # the demo's stage YAMLs name W&B's logger, which jsonargparse cannot build without it
            raise Skip(f"the CLI pipeline needs {' and '.join(missing)} (pip install, or wheels/)")
        import subprocess

        import yaml

        short = {"trainer.accelerator": args.device, "trainer.precision": args.precision,
                 "trainer.max_steps": args.steps, "trainer.max_epochs": 1, "trainer.val_check_interval": None,
                 "trainer.limit_val_batches": 0, "trainer.callbacks": []}  # fmt: skip
        config = {
            "stages": [
                {"name": "sft", "config": str(ROOT / "configs/demo/sft.yaml"), "args": short},
                {"name": "dpo", "config": str(ROOT / "configs/demo/dpo.yaml"), "inputs": {"model.init_args.policy.path": "sft"}, "args": short},
            ],
            "evaluation": {
                "prompt_files": str(DATA / "prompts_eval.jsonl"), "gold": [GOLD], "models": {"sft": "sft", "dpo": "dpo"},
                "reference": "sft", "reward_model": None, "max_prompts": 4,
                "sampling": {"num_samples": 2, "max_new_tokens": 8},
            },
        }  # fmt: skip
        (work / "pipeline.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "lightning_rlhf.cli", "pipeline", "--config", str(work / "pipeline.yaml"),
               "--output_dir", str(work / "pipeline")]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.pipeline_timeout)
        if proc.returncode:
            raise AssertionError(proc.stderr[-2000:] or proc.stdout[-2000:])

    checks = {
        "sft": sft_full, "sft-lora": sft_lora, "sft-qlora": sft_qlora, "reward": reward, "dpo-lora": dpo,
        "ppo-lora+eval": ppo(), "grpo-lora": grpo, "ppo-bf16-true": bf16_true, "ppo-16-mixed": fp16_mixed,
        "pipeline-eval": pipeline_evaluation, "pipeline-cli": pipeline_cli,
    }  # fmt: skip
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for name, fn in checks.items():
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        try:
            fn()
            status, why = "PASS", ""
        except Skip as e:
            status, why = "SKIP", str(e)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the next check still runs
            status, why = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            (work / f"{name}.traceback.txt").write_text(traceback.format_exc())
        secs = time.perf_counter() - start
        line = f"{status} {name:<16} {secs:7.1f}s" + (f"  {why}" if why else "")
        print(line, flush=True)
        results[name] = line
    print("# summary\n" + "\n".join(results.values()), flush=True)  # again, clear of progress bars on stderr
    return {k: v.split()[0] for k, v in results.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--precision", default=None, help="Trainer precision (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps (offline) / prompt batches (online)")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--work_dir", default=None, help="where stage outputs and tracebacks go (default: a temp dir)")
    p.add_argument("--pipeline_timeout", type=int, default=900)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL cuda: torch.cuda.is_available() is False", flush=True)
        return 1
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, lightning {L.__version__}, {name}, precision {args.precision}", flush=True)
    L.seed_everything(0, verbose=False)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    results = run_checks(args, work)
    failed = [k for k, v in results.items() if v == "FAIL"]
    print(f"# {len(results) - len(failed)}/{len(results)} not failed; outputs and tracebacks in {work}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
