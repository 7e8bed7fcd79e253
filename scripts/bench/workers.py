"""One benchmark side in this (fresh) process: ``python workers.py '<job json>'``.

A job is ``{"task": sft|reward|dpo|grpo|rloo|ppo, "side": ours|ours_apart|trl, "cfg": {...}, "assets": {...}}``
(``ours_apart``: reward model / DPO with ``share_prompt=False``; ``ours_sampler``: GRPO / RLOO
with ``generation.dtype`` = ``cfg["sampler_dtype"]``; ``ours_shared``: GRPO / RLOO with
``share_prompt``, plus that ``generation.dtype`` when given; ``ours_packed``: reward model / DPO with
``padding_free``)
(see ``common.py``). Offline tasks (SFT, reward model, DPO) also read ``cfg["attn"]`` (every model's
``attn_implementation``) and ``cfg["compile"]`` (every decoder layer compiled in place; ours through
``CompileLayers``), on both sides. Trains ``warmup + steps`` optimiser steps, times each step, and prints one JSON
line: ``step_s`` (median timed step), ``step_times``, ``first_loss`` (loss of the first batch, before
any update), ``peak_mib`` / ``peak_minus_import_mib`` (CPU RSS high-water mark; GPU allocator
peak), and for the RL tasks ``phases`` (median seconds per step of generate / score / rest).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StepTimes:
    """Wall time of each optimiser step (synchronised on GPU)."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._t = 0.0

    def _sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def start(self):
        self._sync()
        self._t = time.perf_counter()

    def stop(self):
        self._sync()
        self.times.append(time.perf_counter() - self._t)


def summary(times: StepTimes, warmup: int, first_loss: float | None, base_rss: float, device: str, **extra) -> dict:
    timed = times.times[warmup:]
    out = {"step_s": statistics.median(timed), "step_times": timed, "first_loss": first_loss, **extra}
    if device == "cuda":
        import torch

        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_minus_import_mib"] = out["peak_mib"]
    else:
        out["peak_mib"] = rss_peak_mib()
        out["peak_minus_import_mib"] = out["peak_mib"] - base_rss
    if times.phases:
        ph = times.phases[warmup:]
        out["phases"] = {k: statistics.median(p.get(k, 0.0) for p in ph) for k in ph[0]}
    return out


# ------------------------------------------------------------------------------------------ ours


def ours(task: str, cfg: dict, assets: dict, base_rss: float) -> dict:
    import lightning as L
    import torch

    from lightning_rlhf.callbacks import CompileLayers
    from lightning_rlhf.data import RLHFDataModule
    from lightning_rlhf.stages import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
    from lightning_rlhf.stages.common import OptimSpec

    torch.set_num_threads(cfg["threads"])
    optim = OptimSpec(learning_rate=1e-5, scheduler="constant", max_grad_norm=1.0)
    times = StepTimes(cfg["device"])
    first: dict = {}
    n_steps = cfg["warmup"] + cfg["steps"]
    online = task in ("grpo", "rloo", "ppo")

    from lightning_rlhf.models import LoraSpec, ModelSpec

    lora = LoraSpec(r=16, alpha=32) if cfg.get("lora") else None
    attn = cfg.get("attn")  # attn_implementation of the offline stages' models (train_kernels.py); None: transformers'
    policy = ModelSpec(path=assets["policy"], lora=lora, attn_implementation=attn)
    if task == "sft":
        module, data = SFTModule(policy, optim=optim), assets["sft"]
    elif task == "reward":
        module = RewardModule(ModelSpec(assets["classifier"], attn_implementation=attn), optim=optim,
                              share_prompt=cfg.get("share_prompt", True), padding_free=cfg.get("ours_packed", False))  # fmt: skip
        data = assets["preference"]
    elif task == "dpo":
        module = DPOModule(ModelSpec(assets["policy"], attn_implementation=attn), optim=optim,
                           reference=ModelSpec(assets["reference"], attn_implementation=attn), loss_type="sigmoid",
                           beta=0.1, share_prompt=cfg.get("share_prompt", True),
                           padding_free=cfg.get("ours_packed", False))  # fmt: skip
        data = assets["preference"]
    else:
        from lightning_rlhf.rollout import GenerationSpec

        common = dict(optim=optim, log_samples_every_n_steps=0,
                      generation=GenerationSpec(max_new_tokens=cfg["new_tokens"], temperature=1.0,
                                                dtype=cfg["sampler_dtype"] if cfg.get("ours_sampler") else "auto"))  # fmt: skip
        if task == "ppo":
            # A reward model (not a function) as in TRL's PPO; the critic is a value head on the
            # policy's backbone (share_backbone) or, without, a trainable copy of the reward model.
            module = PPOModule(policy, reward_model=assets["classifier"], share_backbone=cfg.get("share_backbone", True),
                               ppo_epochs=1, kl_coef=0.05, **common)  # fmt: skip
        else:
            common["reward_functions"] = ["lightning_rlhf.demo.rewards.gold_reward"]
            module = GRPOModule(
                assets["policy"], num_generations=cfg["generations"], beta=cfg["beta"],
                advantage_estimator="rloo" if task == "rloo" else "grpo",
                kl_in_reward=task == "rloo", loss_agg="seq_mean_token_mean" if task == "grpo" else "token_mean",
                share_prompt=bool(cfg.get("ours_shared")),
                **common,
            )  # fmt: skip
        data = assets["prompt"]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.stop()
            if online:
                m = trainer.callback_metrics
                ph = {k: float(m[f"time/{k}"]) for k in ("generate", "score", "forward", "train") if f"time/{k}" in m}
                times.phases.append(ph | {"rest": times.times[-1] - ph.get("generate", 0) - ph.get("score", 0)})
                if "rollout/response_len" in m:
                    first.setdefault("response_lens", []).append(float(m["rollout/response_len"]))
            elif not first:
                first["loss"] = float(outputs["loss"])

    dm = RLHFDataModule(data, batch_size=cfg["batch"], max_length=cfg["seq"] + 8,
                        max_prompt_length=cfg["seq"], shuffle=False)  # fmt: skip
    trainer = L.Trainer(
        accelerator=cfg["device"], devices=1, precision=cfg["precision"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()] + ([CompileLayers()] if cfg.get("compile") else []), max_epochs=1,
        limit_train_batches=n_steps, num_sanity_val_steps=0,
        **({} if online else {"max_steps": n_steps}),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    from transformers import PreTrainedModel

    held = [m for model in module.held_models() for m in model.modules()]
    models = [m for m in held if isinstance(m, PreTrainedModel)]
    return summary(times, cfg["warmup"], first.get("loss"), base_rss, cfg["device"],
                   response_len=first["response_lens"][-1] if first.get("response_lens") else None,
                   attn_implementations=sorted({m.config._attn_implementation for m in models}),
                   compiled_layers=sum(getattr(m, "_compiled_call_impl", None) is not None for m in held))  # fmt: skip


# ------------------------------------------------------------------------------------------ TRL


def trl_side(task: str, cfg: dict, assets: dict, base_rss: float) -> dict:
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.set_num_threads(cfg["threads"])
    times = StepTimes(cfg["device"])
    first: dict = {}
    n_steps = cfg["warmup"] + cfg["steps"]
    tok = AutoTokenizer.from_pretrained(assets["policy"] if task != "reward" else assets["classifier"])
    common = dict(
        output_dir=os.path.join(os.path.dirname(assets["policy"]), f"trl-{task}"), max_steps=n_steps,
        per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1, learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=cfg["device"] == "cpu", bf16=cfg["precision"].startswith("bf16"), disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
        # TRL 1.x turns activation checkpointing on by default (SFT, Reward, DPO, GRPO, RLOO configs); ours
        # is off unless asked: off on both sides, so that both compute the same forward and backward
        gradient_checkpointing=False,
    )  # fmt: skip

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.start()

        def on_step_end(self, args, state, control, **kw):
            times.stop()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and "loss" not in first:
                first["loss"] = float(logs["loss"])
            if logs and "completions/mean_length" in logs:
                first["response_len"] = float(logs["completions/mean_length"])

    def load(path, cls=AutoModelForCausalLM):
        return cls.from_pretrained(path, dtype=torch.float32, **({"attn_implementation": cfg["attn"]} if cfg.get("attn") else {}))

    def records(path):
        with open(path) as f:
            return datasets.Dataset.from_list([json.loads(line) for line in f])

    def sequential(cls):
        # Same order as ours (shuffle off), so that the first batch -- and its loss -- is the same.
        class Sequential(cls):
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

        return Sequential

    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(max_length=cfg["seq"] + 8, packing=False, completion_only_loss=True, **common)
        trainer = sequential(SFTTrainer)(model=load(assets["policy"]), args=args, train_dataset=records(assets["sft"]),
                                         processing_class=tok)  # fmt: skip
    elif task == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(max_length=cfg["seq"] + 8, center_rewards_coefficient=None, **common)
        trainer = sequential(RewardTrainer)(
            model=load(assets["classifier"], AutoModelForSequenceClassification), args=args,
            train_dataset=records(assets["preference"]), processing_class=tok,
        )  # fmt: skip
    elif task == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(max_length=cfg["seq"] + 8, loss_type=["sigmoid"], beta=0.1, **common)
        trainer = sequential(DPOTrainer)(
            model=load(assets["policy"]), ref_model=load(assets["reference"]), args=args,
            train_dataset=records(assets["preference"]), processing_class=tok,
        )  # fmt: skip
    if task in ("sft", "reward", "dpo") and cfg.get("compile"):  # what CompileLayers does on our side
        from lightning_rlhf.models.distributed import fsdp_units

        for model in (trainer.model, getattr(trainer, "ref_model", None)):
            for layer in fsdp_units(model) if model is not None else []:
                layer.compile()
    if task in ("grpo", "rloo"):
        from lightning_rlhf.demo.rewards import gold_reward

        timing = {"generate": 0.0, "score": 0.0}

        def reward(prompts, completions, **kw):
            t = time.perf_counter()
            out = gold_reward(prompts, completions)
            timing["score"] += time.perf_counter() - t
            return out

        reward.__name__ = "gold_reward"
        rows = cfg["batch"] * cfg["generations"]
        rl = dict(common, per_device_train_batch_size=rows, num_generations=cfg["generations"],
                  max_completion_length=cfg["new_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=cfg["beta"],
                  num_iterations=1, steps_per_generation=1, log_completions=False)  # fmt: skip
        if task == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args = GRPOConfig(loss_type="grpo", scale_rewards="group", **rl)
            cls = GRPOTrainer
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**rl)
            cls = RLOOTrainer
        trainer = cls(model=assets["policy"], reward_funcs=[reward], args=args,
                      train_dataset=records(assets["prompt"]), processing_class=tok)  # fmt: skip
        model = trainer.model
        gen = model.generate

        def timed_generate(*a, **k):
            t = time.perf_counter()
            try:
                return gen(*a, **k)
            finally:
                timing["generate"] += time.perf_counter() - t

        model.generate = timed_generate

        class PhaseTimer(Timer):
            def on_step_begin(self, args, state, control, **kw):
                timing.update(generate=0.0, score=0.0)
                super().on_step_begin(args, state, control, **kw)

            def on_step_end(self, args, state, control, **kw):
                super().on_step_end(args, state, control, **kw)
                # TRL generates inside the step (``_prepare_inputs``), so the step time holds every phase.
                times.phases.append(dict(timing, rest=times.times[-1] - timing["generate"] - timing["score"]))

        trainer.add_callback(PhaseTimer())
        trainer.train()
        return summary(times, cfg["warmup"], None, base_rss, cfg["device"], response_len=first.get("response_len"))
    elif task not in ("sft", "reward", "dpo"):
        raise ValueError(f"no TRL side for task {task!r}")
    trainer.add_callback(Timer())
    trainer.train()
    return summary(times, cfg["warmup"], first.get("loss"), base_rss, cfg["device"])


def trl_ppo(task: str, cfg: dict, assets: dict, base_rss: float) -> dict:
    """TRL's PPOTrainer (0.2x: ``trl.experimental.ppo``): LoRA policy (reference = adapter off),
    a full trainable value model and a frozen reward model (TRL has no shared-backbone critic)."""
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(cfg["threads"])
    times = StepTimes(cfg["device"])
    n_steps = cfg["warmup"] + cfg["steps"]
    tok = AutoTokenizer.from_pretrained(assets["policy"])
    with open(assets["prompt"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    ds = datasets.Dataset.from_list([{"input_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts])
    args = PPOConfig(
        output_dir=os.path.join(os.path.dirname(assets["policy"]), "trl-ppo"), per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=cfg["batch"] * n_steps,
        local_rollout_forward_batch_size=cfg["batch"], response_length=cfg["new_tokens"], stop_token=None,
        temperature=1.0, kl_coef=0.05, learning_rate=1e-5, lr_scheduler_type="constant", num_sample_generations=0,
        report_to="none", save_strategy="no", use_cpu=cfg["device"] == "cpu", bf16=cfg["precision"].startswith("bf16"),
        disable_tqdm=True, logging_steps=1, seed=0, gradient_checkpointing=False,
    )  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(assets["classifier"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["classifier"], num_labels=1)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if cfg.get("lora") else None
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=ds, value_model=value, peft_config=peft)  # fmt: skip

    class Timer(TrainerCallback):
        # TRL's PPO loop calls only on_step_end per rollout batch: a step is the time between two.
        def on_train_begin(self, args, state, control, **kw):
            times.start()

        def on_step_end(self, args, state, control, **kw):
            times.stop()
            times.start()

    trainer.add_callback(Timer())
    trainer.train()
    return summary(times, cfg["warmup"], None, base_rss, cfg["device"], trl_version=trl.__version__)


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch  # noqa: F401  (imports count towards the baseline, not the peak)
    import transformers  # noqa: F401

    if job["side"] == "trl_old":
        sys.path.insert(0, job["trl_path"])  # an older TRL release unpacked beside ours (see ppo.py)
    if job["side"] in ("trl", "trl_old"):
        import trl  # noqa: F401
    else:
        import lightning  # noqa: F401

        import lightning_rlhf.stages  # noqa: F401
    from common import matmul_peak

    cfg = job["cfg"]
    # The matmul peak measured in this process just before and after training: on a shared machine the
    # load changes by the minute, and MFU is only meaningful against the peak of the same moment.
    before = matmul_peak(cfg["device"], cfg["threads"])
    base = current_rss_mib()
    if job["side"] == "ours_apart":  # ours with share_prompt off: the pairs' two rows scored apart
        cfg = dict(cfg, share_prompt=False)
    if job["side"] == "ours_packed":  # reward model / DPO with padding_free (pairs packed, no padding)
        cfg = dict(cfg, ours_packed=True)
    if job["side"] == "ours_sampler":  # ours with generation.dtype = cfg["sampler_dtype"] (online tasks)
        cfg = dict(cfg, ours_sampler=True)
    if job["side"] == "ours_shared":  # GRPO/RLOO with share_prompt (and generation.dtype when given)
        cfg = dict(cfg, ours_shared=True, ours_sampler=bool(cfg.get("sampler_dtype")))
    fn = {"ours": ours, "ours_apart": ours, "ours_sampler": ours, "ours_shared": ours, "ours_packed": ours, "trl": trl_side, "trl_old": trl_ppo}[job["side"]]
    res = fn(job["task"], cfg, job["assets"], base)
    after = matmul_peak(cfg["device"], cfg["threads"])
    res["matmul_peak_tflops"] = {k: (before[k] + after[k]) / 2 for k in before}
    res["import_rss_mib"] = base
    print(json.dumps(res))


if __name__ == "__main__":
    main()
