"""Regenerate README's "Comparison with TRL" table from scripts/bench/results/*.json.

    python scripts/bench/readme_table.py [--results DIR] [--readme README.md] [--check]

Replaces the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in the README;
``--check`` only says whether the README is up to date (exit 1 if not). Runs at
``--precision bf16-mixed`` kept in ``DIR/bf16-mixed/`` get a table of their own, then a table of which
precision is faster for each side (step time fp32 / bf16-mixed, per comparison); runs with
``--attn eager --compile`` kept in ``DIR/bf16-mixed-eager-compile/`` get one more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, ROOT

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ("sft", "reward", "dpo", "grpo", "rloo", "ppo", "scaling")
TRL = {"sft": "SFTTrainer", "reward": "RewardTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _runs(results: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def table(results: Path) -> str:
    text = _table(_runs(results))
    bf16 = results / "bf16-mixed"
    if bf16.is_dir() and _runs(bf16):
        text += ("\n\nThe same comparisons with `--precision bf16-mixed` on both sides "
                 "(`scripts/bench/results/bf16-mixed/`):\n\n" + _table(_runs(bf16)))
        same_run = {}
        for run in _runs(results).values():  # scripts/bench_precision.py's runs
            if run.get("benchmark", "").startswith("precision"):
                same_run |= {stage: dict(x, command=run["command"]) for stage, x in run.get("stages", {}).items()}
        text += "\n\n" + faster(_runs(results), _runs(bf16), same_run)
    kernels = results / "bf16-mixed-eager-compile"
    if kernels.is_dir() and _runs(kernels):
        text += ("\n\nAt bf16-mixed with the same faster kernels on both sides, eager attention and every decoder layer "
                 "compiled (`--attn eager --compile`; ours through `lightning_rlhf.callbacks.CompileLayers`, "
                 "`scripts/bench/results/bf16-mixed-eager-compile/`):\n\n" + _table(_runs(kernels)))
    return text


def faster(fp32: dict, bf16: dict, same_run: dict | None = None) -> str:
    """Which precision is faster for each side: step time at fp32 / at bf16-mixed, per comparison.

    ``same_run``: ``scripts/bench_precision.py``'s results (``precision*.json``: both precisions of both
    sides interleaved in one run, under one load), used where they cover the stage; elsewhere the
    ratio is across the two comparison runs (made at different times: a load change shows in it)."""
    same_run = same_run or {}
    lines = ["Which precision is faster here, per side (step time fp32 / bf16-mixed; > 1: bf16-mixed is faster):", "",
             "| comparison | lightning-rlhf | TRL | fastest ours / fastest TRL (step time) | from |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name in ORDER:
        a, b = fp32.get(name), bf16.get(name)
        if name not in TRL or not a or not b or "figures" not in a or "figures" not in b:
            continue
        steps = {}
        if name in same_run:
            src = f"`{same_run[name]['command']}` (one run)"
            st = same_run[name]["step_s"]
            steps = {side: (st[f"{side} 32"], st[f"{side} bf16-mixed"]) for side in ("ours", "trl")
                     if f"{side} 32" in st and f"{side} bf16-mixed" in st}  # fmt: skip
        if len(steps) < 2:
            src = "the two comparison runs (separate times)"
            steps = {side: (a["figures"][side]["step_s"], b["figures"][side]["step_s"]) for side in ("ours", "trl")
                     if side in a["figures"] and side in b["figures"]}  # fmt: skip
        cells = []
        for side in ("ours", "trl"):
            if side not in steps:
                cells.append("-")
                continue
            r = steps[side][0] / steps[side][1]
            cells.append(f"{r:.2f}x: **{'bf16-mixed' if r > 1 else 'fp32'}**")
        ratio = f"{min(steps['ours']) / min(steps['trl']):.2f}x" if len(steps) == 2 else "-"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | {src} |")
    return "\n".join(lines)


def _table(runs: dict) -> str:
    cmp_rows, other = [], []
    machine = None
    for name in ORDER:
        r = runs.get(name)
        if r is None:
            continue
        machine = machine or r.get("machine")
        if name in TRL and "ours_over_trl" in r:
            s, f, q = r["settings"], r["figures"], r["ours_over_trl"]
            online = name in ("grpo", "rloo")
            shape = (f"{s['batch']} prompts x {s['generations']} samples, {s['seq']}+{s['new_tokens']} tokens"
                     if online else f"batch {s['batch']} x seq {s['seq']}")  # fmt: skip
            check = r.get("first_loss_check")
            loss = "-" if not check else f"{check['ours']:.5f} / {check['trl']:.5f} ({'same' if check['ok'] else 'DIFFERENT'})"
            cmp_rows.append(
                f"| {name} vs TRL {TRL[name]} | h{s['hidden']}/{s['layers']}L/V{s['vocab']}, {shape}, {'fp32' if s['precision'] == '32' else s['precision']}"
                + (f", attn {s['attn']}" if s.get("attn") else "") + (", compiled layers" if s.get("compile") else "") + " "
                f"| {f['ours']['tokens_per_s']:.0f} / {f['trl']['tokens_per_s']:.0f} (**{q['tokens_per_s']:.2f}x**"
                + (f"; share_prompt off {r['ours_apart_over_trl']['tokens_per_s']:.2f}x" if "ours_apart_over_trl" in r else "")
                + ") "
                f"| {q['step_time']:.2f}x | {_pct(f['ours']['mfu'])} / {_pct(f['trl']['mfu'])} "
                f"| {f['ours']['peak_mib']:.0f} / {f['trl']['peak_mib']:.0f} ({q['peak_mib']:.2f}x; net {q['peak_minus_import_mib']:.2f}x) "
                f"| {loss} | `{r['command']}` |"
            )  # fmt: skip
            if "ours_sampler_over_trl" in r:  # our side with generation.dtype: labelled, never the default row
                a, q = f["ours_sampler"], r["ours_sampler_over_trl"]
                cmp_rows.append(
                    f"| {name}, ours with `generation.dtype: {q['sampler_dtype']}` (not the default comparison) vs TRL {TRL[name]} "
                    f"| same | {a['tokens_per_s']:.0f} / {f['trl']['tokens_per_s']:.0f} ({q['tokens_per_s']:.2f}x) "
                    f"| {q['step_time']:.2f}x (ours default: {q['step_time'] / r['ours_sampler_over_ours']['step_time']:.2f}x) "
                    f"| - | {a['peak_mib']:.0f} / {f['trl']['peak_mib']:.0f} | - | `{r['command']}` |"
                )  # fmt: skip
            if "ours_shared_over_trl" in r:  # our side with share_prompt: labelled, never the default row
                a, q, u = f["ours_shared"], r["ours_shared_over_trl"], r["ours_shared_over_unshared"]
                what = "`share_prompt: true`" + (f" + `generation.dtype: {q['sampler_dtype']}`" if q["sampler_dtype"] else "")
                cmp_rows.append(
                    f"| {name}, ours with {what} (not the default comparison) vs TRL {TRL[name]} "
                    f"| same | {a['tokens_per_s']:.0f} / {f['trl']['tokens_per_s']:.0f} ({q['tokens_per_s']:.2f}x) "
                    f"| {q['step_time']:.2f}x ({u['step_time']:.2f}x {u['baseline']} without share_prompt) "
                    f"| - | {a['peak_mib']:.0f} / {f['trl']['peak_mib']:.0f} | - | `{r['command']}` |"
                )  # fmt: skip
        elif "summary" in r:
            other.append(f"| {name} | {r['summary']} | `{r['command']}` |")
    if machine is None:
        return "(no results yet: run `python scripts/bench/run_all.py`)"
    first = next(runs[n] for n in ORDER if n in runs)  # the machine line: from the first run in ORDER
    machine, peaks = first.get("machine", machine), first.get("matmul_peak_tflops", {})
    lines = [
        f"Machine: {machine.get('gpu') or machine.get('cpu')} ({machine.get('cpu_count')} cores, load "
        f"{machine.get('load_avg_1m_at_start', 0):.1f} at the start of {first['benchmark']}; each JSON has its own), torch {machine.get('torch')}, transformers "
        f"{machine.get('transformers')}, TRL {machine.get('trl')}. Measured matmul peak: fp32 "
        f"{peaks.get('fp32', 0) * 1e3:.0f} GFLOP/s, bf16 {peaks.get('bf16', 0) * 1e3:.0f} GFLOP/s at that moment "
        "(MFU uses the peak each worker measures around its own training).",
        "",
        "| comparison | model, batch | tokens/s ours / TRL (ratio) | step time ours/TRL | MFU ours / TRL "
        "| peak MiB ours / TRL | first-batch loss ours / TRL | command |",
        "|---|---|---|---|---|---|---|---|",
        *cmp_rows,
    ]
    if other:
        lines += ["", "| benchmark | result | command |", "|---|---|---|", *other]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.readme}: no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table(args.results)}\n{END}{tail}"
    if args.check:
        sys.exit(0 if new == text else "README's benchmark table is out of date: run scripts/bench/readme_table.py")
    args.readme.write_text(new)
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
