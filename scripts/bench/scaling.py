"""Scaling of our DPO and PPO steps: step time and peak memory as sequence length and batch double.

    python scripts/bench/scaling.py [--size tiny|small|mid] [--device cpu|cuda] [--points 4]

- DPO (sigmoid, frozen reference copy): sequence length 64, 128, 256, 512 at batch 2; batch 1, 2, 4, 8
  at sequence length 128.
- PPO (LoRA policy, adapter-off reference, value head on the policy, reward model), one step split
  into generate / score / forward (old log-probs, reference, values) / train: new tokens 16, 32, 64,
  128 at 4 prompts of 32 tokens; prompts 2, 4, 8, 16 at 32 new tokens.

Every point is a fresh process (``workers.py``; one warm-up step, then ``--steps`` timed). Step times
(and phases) are load-adjusted: multiplied by the fp32 matmul peak the point's process measured
around its run over the sweep's median peak (``step_s_raw`` keeps the wall time). Writes
scaling.json / .md and scaling.png (matplotlib) into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from common import (
    add_common_args,
    build_assets,
    fmt,
    machine,
    run_worker,
    settings,
    tmpdir,
    write_report,
)


def sweep(task: str, base: dict, axis: str, values: list[int], work) -> list[dict]:
    points = []
    for v in values:
        cfg = base | {axis: v}
        if task == "ppo":
            cfg |= {"lora": True, "prompt_len": cfg["seq"]}
            assets = build_assets(cfg, work / f"{task}-{axis}-{v}", kinds=("prompt", "reward"))
        else:
            assets = build_assets(cfg, work / f"{task}-{axis}-{v}", kinds=("preference",))
        res = run_worker({"task": task, "side": "ours", "cfg": cfg, "assets": assets})
        print(f"  {task} {axis}={v}: {res['step_s']:.3f} s/step, peak {res['peak_mib']:.0f} MiB", flush=True)
        points.append({axis: v, "step_s": res["step_s"], "peak_mib": res["peak_mib"],
                       "peak_minus_import_mib": res["peak_minus_import_mib"], "phases": res.get("phases"),
                       "matmul_fp32_tflops": res["matmul_peak_tflops"]["fp32"]})  # fmt: skip
    # On a shared machine the load moves between points (5x seen); each worker measured the fp32 matmul
    # peak around its own run, so time x (its peak / the sweep's median peak) puts the points on one clock.
    ref = statistics.median(p["matmul_fp32_tflops"] for p in points)
    for p in points:
        k = p["matmul_fp32_tflops"] / ref
        p["step_s_raw"], p["step_s"] = p["step_s"], p["step_s"] * k
        if p["phases"]:
            p["phases"] = {name: t * k for name, t in p["phases"].items()}
    return points


def plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, axis) in zip(axes[0], (("dpo_seq", "seq"), ("dpo_batch", "batch")), strict=True):
        pts = out["sweeps"][name]
        x = [p[axis] for p in pts]
        ax.plot(x, [p["step_s"] for p in pts], "o-", color="C0", label="step time")
        ax.set_xscale("log", base=2)
        ax.set_xlabel({"seq": "sequence length (batch 2)", "batch": "pairs per batch (seq 128)"}[axis])
        ax.set_ylabel("s / step (load-adjusted)")
        ax.set_title(f"DPO: {axis} doubles")
        ax2 = ax.twinx()
        ax2.plot(x, [p["peak_minus_import_mib"] for p in pts], "s--", color="C3", label="peak RSS - imports")
        ax2.set_ylabel("MiB", color="C3")
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
    for ax, (name, axis) in zip(axes[1], (("ppo_new_tokens", "new_tokens"), ("ppo_batch", "batch")), strict=True):
        pts = out["sweeps"][name]
        x = [str(p[axis]) for p in pts]
        bottom = [0.0] * len(pts)
        for i, phase in enumerate(("generate", "score", "forward", "train")):
            h = [(p["phases"] or {}).get(phase, 0.0) for p in pts]
            ax.bar(x, h, bottom=bottom, color=f"C{i}", label=phase)
            bottom = [b + v for b, v in zip(bottom, h, strict=True)]
        ax.set_xlabel({"new_tokens": "new tokens (4 prompts)", "batch": "prompts per step (32 new tokens)"}[axis])
        ax.set_ylabel("s / step (load-adjusted)")
        ax.set_title(f"PPO step (LoRA, shared critic): {axis} doubles")
        ax2 = ax.twinx()
        ax2.plot(x, [p["peak_minus_import_mib"] for p in pts], "s--", color="k", label="peak RSS - imports")
        ax2.set_ylabel("MiB")
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
    s = out["settings"]
    fig.suptitle(f"lightning-rlhf scaling, h{s['hidden']}/{s['layers']} layers/V{s['vocab']}, {s['device']}, "
                 f"precision {s['precision']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, batch=2, seq=128, steps=1)
    p.set_defaults(size="tiny", rounds=1)
    p.add_argument("--points", type=int, default=4)
    args = p.parse_args()
    base = settings(args)
    work = tmpdir()
    n = args.points
    sweeps = {
        "dpo_seq": sweep("dpo", base | {"batch": 2}, "seq", [64 * 2**i for i in range(n)], work),
        "dpo_batch": sweep("dpo", base | {"seq": 128}, "batch", [2**i for i in range(n)], work),
        "ppo_new_tokens": sweep("ppo", base | {"batch": 4, "seq": 32}, "new_tokens", [16 * 2**i for i in range(n)], work),
        "ppo_batch": sweep("ppo", base | {"seq": 32, "new_tokens": 32}, "batch", [2 * 2**i for i in range(n)], work),
    }
    shutil.rmtree(work, ignore_errors=True)
    out = {"settings": base, "machine": machine(), "sweeps": sweeps}
    lines = []
    for name, pts in sweeps.items():
        axis = next(k for k in pts[0] if k not in ("step_s", "peak_mib", "peak_minus_import_mib", "phases"))
        t0, m0 = pts[0]["step_s"], pts[0]["peak_minus_import_mib"]
        lines += [f"**{name}**", "", f"| {axis} | s/step (load-adjusted) | x first | peak MiB | net peak MiB | generate | score | forward | train |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for q in pts:
            ph = q["phases"] or {}
            lines.append(f"| {q[axis]} | {fmt(q['step_s'])} | {q['step_s'] / t0:.2f} | {fmt(q['peak_mib'], '.0f')} | "
                         f"{fmt(q['peak_minus_import_mib'], '.0f')} | {fmt(ph.get('generate'))} | {fmt(ph.get('score'))} | "
                         f"{fmt(ph.get('forward'))} | {fmt(ph.get('train'))} |")  # fmt: skip
        lines.append("")
        out.setdefault("growth", {})[name] = {"step_time_x": pts[-1]["step_s"] / t0,
                                              "net_peak_x": pts[-1]["peak_minus_import_mib"] / m0}  # fmt: skip
    g = out["growth"]
    out["summary"] = (
        f"{2 ** (n - 1)}x longer DPO sequences: step {g['dpo_seq']['step_time_x']:.1f}x, net peak memory "
        f"{g['dpo_seq']['net_peak_x']:.1f}x; {2 ** (n - 1)}x the DPO batch: {g['dpo_batch']['step_time_x']:.1f}x, "
        f"{g['dpo_batch']['net_peak_x']:.1f}x; PPO {2 ** (n - 1)}x new tokens: {g['ppo_new_tokens']['step_time_x']:.1f}x, "
        f"{g['ppo_new_tokens']['net_peak_x']:.1f}x; {2 ** (n - 1)}x prompts: {g['ppo_batch']['step_time_x']:.1f}x, "
        f"{g['ppo_batch']['net_peak_x']:.1f}x (h{base['hidden']}/{base['layers']}L; plot: scripts/bench/results/scaling.png)"
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    plot(out, args.out / "scaling.png")
    write_report("scaling", args.out, out, "\n".join(lines + [out["summary"]]))


if __name__ == "__main__":
    main()
