"""fp32 vs bf16 on this machine: matmul throughput at the benchmark's shapes, and the step time of our
SFT / reward-model / DPO stages at ``32``, ``bf16-mixed`` and ``bf16-true``, side by side.

    python scripts/bench_precision.py [--threads 1] [--stages sft,reward,dpo] [--rounds 2] [--steps 2] [--no-trl]
    python scripts/bench_precision.py --matmul-only

1. Matmuls: the GEMMs of one training step of the benchmark's model (``scripts/bench``: Llama
   h512/8 layers/V32000, batch 4 x seq 128 = 512 token rows): the attention projections, the MLP, the
   LM head, forward (``x @ W^T``) and the two backward products (``dY @ W`` and ``dY^T @ x``), plus
   the 1024-square matmul that the benchmarks call the peak. fp32 vs bf16, best of several repeats,
   alternated; GFLOP/s and the ratio.
2. Stages: each of ``--stages`` trained in a fresh process per run (``scripts/bench/workers.py``) by our
   own module with the Trainer's precision ``32``, ``bf16-mixed`` (autocast over fp32 weights, the
   fused AdamW) and ``bf16-true`` (bf16 weights and optimiser state), and by TRL's trainer at fp32 and
   ``bf16=True`` (its bf16-mixed; ``--no-trl`` to leave it out). All runs interleave round by round,
   medians over rounds; the ratio is that side's fp32 step time / this step time (> 1: faster), so
   "which precision is faster for each side" comes from one run under one load.

Writes ``scripts/bench/results/precision.json`` / ``.md`` (``--out`` to change the folder); with
``--stages`` naming one stage, ``precision-<stage>.json`` (so that the stages can run one command each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

import torch  # noqa: E402
from common import RESULTS, SIZES, build_assets, interleaved, machine, tmpdir, write_report  # noqa: E402

PRECISIONS = ("32", "bf16-mixed", "bf16-true")
RUNS = {"ours": PRECISIONS, "trl": ("32", "bf16-mixed")}
KINDS = {"sft": ("sft",), "reward": ("reward",), "dpo": ("preference",)}


def gemm_shapes(hidden: int, layers: int, vocab: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """``name: (m, k, n)`` of ``(m, k) @ (k, n)`` for one step of the Llama of ``scripts/bench``."""
    inter = int(hidden * 8 / 3) // 64 * 64
    out = {}
    for name, (fan_in, fan_out) in {"attn proj": (hidden, hidden), "mlp up/gate": (hidden, inter),
                                    "mlp down": (inter, hidden), "lm head": (hidden, vocab)}.items():  # fmt: skip
        out[f"{name} fwd"] = (tokens, fan_in, fan_out)  # x @ W^T
        out[f"{name} bwd dx"] = (tokens, fan_out, fan_in)  # dY @ W
        out[f"{name} bwd dW"] = (fan_out, tokens, fan_in)  # dY^T @ x
    out["square 1024 (peak)"] = (1024, 1024, 1024)
    return out


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_s: float = 0.2) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    reps, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        t = time.perf_counter() - start
        if t >= min_s:
            break
        reps *= 2
    return 2 * m * k * n * reps / t / 1e9


def matmuls(threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    hidden, layers, vocab = SIZES["mid"]
    rows = []
    for name, (m, k, n) in gemm_shapes(hidden, layers, vocab, tokens=4 * 128).items():
        res = {"fp32": [], "bf16": []}
        for _ in range(repeats):  # alternate the dtypes, keep each one's best
            res["fp32"].append(gemm_gflops(m, k, n, torch.float32))
            res["bf16"].append(gemm_gflops(m, k, n, torch.bfloat16))
        fp32, bf16 = max(res["fp32"]), max(res["bf16"])
        rows.append({"gemm": name, "shape": f"({m}x{k}) @ ({k}x{n})", "fp32_gflops": fp32, "bf16_gflops": bf16,
                     "bf16_over_fp32": bf16 / fp32})  # fmt: skip
        print(f"  {name:<22} {rows[-1]['shape']:<26} fp32 {fp32:7.1f}  bf16 {bf16:7.1f} GFLOP/s  {bf16 / fp32:.2f}x",
              flush=True)  # fmt: skip
    return rows


def stages(args) -> dict:
    out = {}
    for stage in args.stages.split(","):
        cfg = {"size": args.size, "batch": 4, "seq": 128, "steps": args.steps, "warmup": 1, "rounds": args.rounds,
               "threads": args.threads, "device": "cpu", "prompt_frac": 0.5}  # fmt: skip
        cfg |= dict(zip(("hidden", "layers", "vocab"), SIZES[args.size], strict=True))
        work = tmpdir()
        try:
            assets = build_assets(cfg, work, kinds=KINDS[stage])
            runs = {side: precs for side, precs in RUNS.items() if side == "ours" or args.trl}
            jobs = {f"{side} {p}": {"task": stage, "side": side, "cfg": cfg | {"precision": p}, "assets": assets}
                    for side, precs in runs.items() for p in precs}  # fmt: skip
            print(f"[{stage}] {', '.join(jobs)}; {args.rounds} rounds interleaved", flush=True)
            res = interleaved(jobs, args.rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        step = {k: statistics.median(r["step_s"] for r in res[k]) for k in jobs}
        out[stage] = {
            "step_s": step,
            "fp32_over": {k: step[f"{k.split()[0]} 32"] / step[k] for k in jobs},
            "first_loss": {k: res[k][0].get("first_loss") for k in jobs},
            "rounds_step_s": {k: [r["step_s"] for r in res[k]] for k in jobs},
            "peak_mib": {k: statistics.median(r["peak_mib"] for r in res[k]) for k in jobs},
            "matmul_peak_tflops": {k: [r["matmul_peak_tflops"] for r in res[k]] for k in jobs},
        }  # fmt: skip
    return out


def table(payload: dict) -> str:
    lines = []
    if payload.get("matmuls"):
        lines += [f"Matmuls at the benchmark's shapes (h512/8 layers/V32000, 512 token rows), {payload['threads']} thread(s):",
                  "", "| GEMM | shape | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---|---|---|---|"]  # fmt: skip
        for r in payload["matmuls"]:
            lines.append(f"| {r['gemm']} | {r['shape']} | {r['fp32_gflops']:.1f} | {r['bf16_gflops']:.1f} | "
                         f"{r['bf16_over_fp32']:.2f}x |")  # fmt: skip
    if payload.get("stages"):
        lines += ["", f"Step time (s) by precision ({payload['size']} model, batch 4 x seq 128, {payload['threads']} thread(s), fresh process per run, "
                  "runs interleaved, medians over rounds; (ratio) = the side's fp32 step / this step, > 1: faster; "
                  "TRL's bf16-mixed is `bf16=True`):", "",
                  "| stage | side | 32 | bf16-mixed | bf16-true | faster here | first-batch loss 32 / bf16-mixed (/ bf16-true) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for stage, s in payload["stages"].items():
            for side, precs in RUNS.items():
                keys = [f"{side} {p}" for p in precs]
                if keys[0] not in s["step_s"]:
                    continue
                cells = [f"{s['step_s'][k]:.3f}" + ("" if k.endswith(" 32") else f" ({s['fp32_over'][k]:.2f}x)") for k in keys]
                cells += ["-"] * (len(PRECISIONS) - len(cells))
                best = min(keys, key=lambda k: s["step_s"][k]).split(" ", 1)[1]
                best = "fp32" if best == "32" else best
                losses = " / ".join("-" if s["first_loss"][k] is None else f"{s['first_loss'][k]:.5f}" for k in keys)
                name = "lightning-rlhf" if side == "ours" else "TRL"
                lines.append(f"| {stage} | {name} | " + " | ".join(cells) + f" | **{best}** | {losses} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", default="sft,reward,dpo", help="comma-separated: sft, reward, dpo ('' for none)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", choices=sorted(SIZES), default="mid", help="the stages' model (see scripts/bench/common.py)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="matmul measurements per dtype (best kept)")
    p.add_argument("--matmul-only", action="store_true")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="our stages only (no TRL runs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    print(f"matmuls, {args.threads} thread(s):", flush=True)
    payload = {"threads": args.threads, "size": args.size, "machine": machine(), "matmuls": matmuls(args.threads, args.repeats)}
    if not args.matmul_only and args.stages:
        payload["stages"] = stages(args)
    stages_run = [x for x in args.stages.split(",") if x] if not args.matmul_only else []
    name = f"precision-{stages_run[0]}" if len(stages_run) == 1 else "precision"
    write_report(name, args.out, payload, table(payload))
    print(json.dumps({k: v["fp32_over"] for k, v in payload.get("stages", {}).items()}))


if __name__ == "__main__":
    main()
