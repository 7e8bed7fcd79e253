"""What every benchmark of ``scripts/bench/`` shares: settings, assets, the hardware limit, workers, reports.

A comparison builds its assets once (a random Llama saved as a Hugging Face folder, the demo's
word-level tokenizer, JSONL records whose every example has exactly ``--seq`` tokens), measures this
machine's matmul throughput, then runs each side (``ours`` / ``trl``) in a *fresh process*
(``workers.py``) so that one side's allocations never count towards the other's peak. Rounds
interleave the sides (ours, trl, ours, trl, ...) so that a load change on a shared machine hits both;
figures are medians over rounds, and the ratio ours/TRL is the number to read.

Figures (per side): median step time over the timed steps, training tokens/s (non-padding tokens
of the step's batch / step time; there is no padding, every example is ``--seq`` long), peak memory
(CPU: the process's RSS high-water mark ``ru_maxrss``, also minus the RSS after imports; GPU:
``torch.cuda.max_memory_allocated``), the first batch's loss (before any update) and MFU.

MFU = 6 * N * tokens/s / peak, with N the parameters of the matmuls a token goes through (every
parameter except the input embedding, whose lookup is no matmul; the LM head counts) and peak the
square-matmul throughput at the run's precision (fp32, or bf16 for ``bf16-*``; n=1024 on CPU, 8192 on
GPU) that the worker's own process measures just before and just after its training (the mean of the
two: on a shared machine the load changes by the minute). MFU is the median over rounds. Attention's
own FLOPs (``QK^T`` and ``AV``: 12 * layers * hidden * seq per token for forward + backward) are NOT
counted -- at seq 128 and hidden 512 they add about 2% -- and neither is the frozen reference model's
forward of DPO / GRPO (model-FLOPs utilisation of the trained model only). For the reward model and
DPO, tokens/s counts both sequences of every pair in full (``2 * seq`` per pair, the same on every
side), while MFU counts the tokens a side computes: with ``share_prompt`` (ours, the default) the
prompt once per pair (``2 * seq - prompt``), so MFU stays a utilisation, not a speed-up.

Preference records have a prompt of ``--prompt-frac`` (default half) of the ``seq`` tokens; the
reward and DPO comparisons also run ours with ``share_prompt`` off (side ``ours_apart``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
WORDS_FROM = 10  # the demo vocabulary's first 10 entries are special tokens and punctuation

SIZES = {
    # name: (hidden, layers, vocab)
    "mid": (512, 8, 32000),
    "small": (256, 4, 32000),
    "tiny": (128, 2, 8000),
    # the H100 model: Llama h2048/16 layers/V32000 (~0.9B parameters); for --device cuda
    "large": (2048, 16, 32000),
}


def add_common_args(p: argparse.ArgumentParser, *, batch: int = 4, seq: int = 128, steps: int = 3) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="mid", help="model: mid = h512/8 layers/V32000")
    p.add_argument("--batch", type=int, default=batch, help="examples (pairs; prompts for RL) per step")
    p.add_argument("--seq", type=int, default=seq, help="tokens per example (prompt + completion incl. EOS)")
    p.add_argument("--steps", type=int, default=steps, help="timed optimiser steps per side and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per side, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON and Markdown results")
    p.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl (reward/dpo: also ours_apart)")
    p.add_argument("--prompt-frac", dest="prompt_frac", type=float, default=0.5,
                   help="preference pairs: the prompt's share of each example's --seq tokens")  # fmt: skip
    p.add_argument("--lengths", choices=["fixed", "varied"], default="fixed",
                   help="preference pairs: every prompt and response at its full length (fixed), or as in real data, "
                        "lengths that vary within a batch (varied: 1/4 to all of the prompt's tokens, 1/8 to all of "
                        "a response's; every batch holds the same mix of lengths, in another order)")  # fmt: skip


def settings(args: argparse.Namespace) -> dict:
    hidden, layers, vocab = SIZES[args.size]
    return {k: v for k, v in vars(args).items() if k not in ("out",)} | {
        "hidden": hidden, "layers": layers, "vocab": vocab,
    }


# ------------------------------------------------------------------------------------------ machine


def machine() -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for pkg in ("trl", "lightning", "peft"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def matmul_peak(device: str, threads: int) -> dict[str, float]:
    """Best-of-several square matmul throughput, TFLOP/s, in fp32 and bf16 (2 n^3 FLOPs per matmul)."""
    import torch

    torch.set_num_threads(threads)
    n = 8192 if device == "cuda" else 1024
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        reps = 20 if device == "cuda" else 3
        best = float("inf")
        for _ in range(4):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / reps)
        out[name] = 2 * n**3 / best / 1e12
    return out


def peak_for(precision: str, peaks: dict[str, float]) -> float:
    return peaks["bf16"] if precision.startswith("bf16") else peaks["fp32"]


# ------------------------------------------------------------------------------------------ assets


def build_assets(cfg: dict, out: Path, *, kinds: tuple[str, ...]) -> dict:
    """Model folders and data files for ``cfg``; returns their paths.

    ``policy``: a random Llama (seed 0); ``reference``: the same architecture, seed 1 (so that DPO's
    first-batch loss is not trivially log 2); ``classifier``: a one-label sequence classifier (seed 0,
    score head included). Records use words of the demo vocabulary, one token each; every SFT example
    and every DPO/RM response is ``seq`` tokens including the EOS both sides append.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from lightning_rlhf.demo.assets import tokenizer_dir, vocabulary
    from lightning_rlhf.models import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir())
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=int(cfg["hidden"] * 8 / 3) // 64 * 64,
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["hidden"] // 64, num_key_value_heads=cfg["hidden"] // 64,
        max_position_embeddings=max(512, 2 * cfg["seq"] + 64), pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    paths = {}
    for name, seed, cls in (("policy", 0, LlamaForCausalLM), ("reference", 1, LlamaForCausalLM),
                            ("classifier", 0, LlamaForSequenceClassification)):  # fmt: skip
        if name == "classifier" and "reward" not in kinds:
            continue
        if name == "reference" and "preference" not in kinds:
            continue
        torch.manual_seed(seed)
        c = config.__class__.from_dict(config.to_dict() | ({"num_labels": 1} if name == "classifier" else {}))
        model = cls(c)
        path = out / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = str(path)
    paths["tokenizer"] = str(tokenizer_dir())

    words = vocabulary()[WORDS_FROM:]
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    seq, prompt_len = cfg["seq"], cfg["seq"] // 4
    n_records = cfg["batch"] * (cfg["warmup"] + cfg["steps"]) + cfg["batch"]
    order = random.Random(2)

    def shuffled(lengths: list) -> list:  # each batch its own order (fixed lengths: all the same)
        return order.sample(lengths, len(lengths))

    data = {
        "sft": [{"prompt": text(prompt_len), "completion": " " + text(seq - prompt_len - 1)} for _ in range(n_records)],
        "preference": [
            {"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
            for _ in range(n_records // cfg["batch"])
            for p, c, r in shuffled(pair_lengths(cfg))
        ],
        "prompt": [{"prompt": text(cfg.get("prompt_len", prompt_len))} for _ in range(n_records)],
    }
    for kind in kinds:
        key = "preference" if kind == "reward" else kind
        path = out / f"{key}.jsonl"
        with open(path, "w") as f:
            for r in data[key]:
                f.write(json.dumps(r) + "\n")
        paths[key] = str(path)
    return paths


def pair_prompt_len(cfg: dict) -> int:
    """Prompt tokens of a preference record (its chosen and rejected responses take the rest of ``seq``)."""
    return max(1, min(cfg["seq"] - 2, int(cfg["seq"] * cfg.get("prompt_frac", 0.5))))


def pair_lengths(cfg: dict) -> list[tuple[int, int, int]]:
    """The (prompt, chosen, rejected) word counts of one batch of preference records, one token each plus
    the EOS after each response; every batch holds this mix, shuffled. ``fixed``: the prompt's share of
    ``seq`` and the rest for each response; ``varied``: drawn once (seed 1) within those bounds."""
    prompt = pair_prompt_len(cfg)
    response = cfg["seq"] - prompt - 1
    if cfg.get("lengths", "fixed") == "fixed":
        return [(prompt, response, response)] * cfg["batch"]
    rng = random.Random(1)
    span = (max(1, prompt // 4), prompt), (max(1, response // 8), response)
    return [(rng.randint(*span[0]), rng.randint(*span[1]), rng.randint(*span[1])) for _ in range(cfg["batch"])]


def pair_tokens(cfg: dict, shared: bool) -> int:
    """Real tokens of one batch of pairs: each row ``prompt + response + EOS``, or with the prompt once
    (``shared``: ``[prompt, chosen, rejected]``)."""
    return sum((1 if shared else 2) * p + c + r + 2 for p, c, r in pair_lengths(cfg))


def matmul_params(model_dir: str) -> int:
    """Parameters a token's forward multiplies by: all but the input embedding (see the module doc)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, two norms
    head = h * (getattr(c, "num_labels", 1) if "SequenceClassification" in (c.architectures or [""])[0] else v)
    return layers * per_layer + h + head


# ------------------------------------------------------------------------------------------ running


def run_worker(job: dict, timeout: float = 1800) -> dict:
    """Run ``workers.py`` on ``job`` in a fresh process; its last stdout line is the result JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(job["cfg"]["threads"]), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", WANDB_MODE="disabled")  # fmt: skip
    cmd = [sys.executable, str(HERE / "workers.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"worker {job['task']}/{job['side']} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def interleaved(jobs: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    """Each job ``rounds`` times, in the order a, b, a, b, ...; results by job name."""
    results: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            t = time.perf_counter()
            res = run_worker(job)
            print(f"  round {r + 1}/{rounds} {name}: {res.get('step_s', float('nan')):.3f} s/step "
                  f"({time.perf_counter() - t:.0f}s wall)", flush=True)  # fmt: skip
            results[name].append(res)
    return results


def median_of(results: list[dict], key: str) -> float | None:
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lrlhf-bench-"))


# ------------------------------------------------------------------------------------------ reports


def write_report(name: str, out: Path, payload: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_1m_at_end": os.getloadavg()[0],
               **payload}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"# {name}\n\n`{payload['command']}`\n\n{table}\n")
    print(table)
    print(f"wrote {out / (name + '.json')} and .md")


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)
