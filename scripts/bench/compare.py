"""Side-by-side comparison of one stage, ours vs TRL (used by ``sft.py``, ``reward.py``, ``dpo.py``,
``grpo.py``, ``rloo.py``); see ``common.py`` for what is measured and how."""

from __future__ import annotations

import argparse
import shutil

from common import (
    add_common_args,
    build_assets,
    fmt,
    interleaved,
    machine,
    matmul_params,
    matmul_peak,
    median_of,
    pair_prompt_len,
    pair_tokens,
    peak_for,
    settings,
    tmpdir,
    write_report,
)

KINDS = {"sft": ("sft",), "reward": ("reward",), "dpo": ("preference",), "grpo": ("prompt",), "rloo": ("prompt",)}
TRL_NAME = {"sft": "SFTTrainer", "reward": "RewardTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer",
            "rloo": "RLOOTrainer"}  # fmt: skip
LOSS_RTOL = 1e-3  # first-batch losses of the two sides must agree this closely (relative)


def parser(task: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if task in ("grpo", "rloo"):
        add_common_args(p, batch=2, seq=32, steps=2)
        p.add_argument("--generations", type=int, default=4, help="samples per prompt (group size)")
        p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32, help="max new tokens per sample")
        p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (both sides)")
        p.add_argument("--sampler-dtype", dest="sampler_dtype", choices=["bfloat16", "float16", "float32"], default=None,
                       help="also run OUR side with generation.dtype set to this (the hf sampler's low-precision copy "
                            "of the policy), as an extra side 'ours_sampler' reported in its own labelled row; "
                            "the ours/TRL comparison stays the default (generation.dtype auto)")  # fmt: skip
        p.add_argument("--share-prompt", dest="share_prompt", action="store_true",
                       help="also run OUR side with share_prompt=True (one row [prompt, r1..rG] per group in the "
                            "reference and training forwards), as an extra side 'ours_shared' in its own labelled "
                            "row (with --sampler-dtype: with that generation.dtype too); the ours/TRL comparison "
                            "stays the default (share_prompt off)")  # fmt: skip
    else:
        add_common_args(p)
        p.add_argument("--attn", default=None, help="attn_implementation of every model on both sides (eager, sdpa, "
                       "...; default: transformers' choice, sdpa)")  # fmt: skip
        p.add_argument("--compile", action="store_true",
                       help="both sides: every decoder layer compiled in place (regional torch.compile; ours through "
                            "the callback lightning_rlhf.callbacks.CompileLayers); give --warmup 2 or more")  # fmt: skip
    if task in ("reward", "dpo"):  # also ours with share_prompt off, side by side in the same run
        p.set_defaults(sides="ours,ours_apart,trl")
        p.add_argument("--padding-free", dest="padding_free", action="store_true",
                       help="also run OUR side with padding_free=True (the pairs' [prompt, chosen, rejected] rows "
                            "packed, no padding), as an extra side 'ours_packed' in its own labelled row; pays with "
                            "--lengths varied")  # fmt: skip
    return p


def run(task: str, args: argparse.Namespace) -> dict:
    cfg = settings(args)
    if task in ("grpo", "rloo"):
        cfg["prompt_len"] = cfg["seq"]
    work = tmpdir()
    assets = build_assets(cfg, work, kinds=KINDS[task])
    peaks = matmul_peak(cfg["device"], cfg["threads"])
    print(f"[{task}] matmul peak here: fp32 {peaks['fp32']:.3f}, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)
    sides = args.sides.split(",")
    if getattr(args, "sampler_dtype", None) and "ours_sampler" not in sides:
        sides.append("ours_sampler")
    if getattr(args, "share_prompt", False) and "ours_shared" not in sides:
        sides.append("ours_shared")
    if getattr(args, "padding_free", False) and "ours_packed" not in sides:
        sides.append("ours_packed")
    jobs = {s: {"task": task, "side": s, "cfg": cfg, "assets": assets} for s in sides}
    n_params = matmul_params(assets["classifier" if task == "reward" else "policy"])
    try:
        results = interleaved(jobs, cfg["rounds"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    online = task in ("grpo", "rloo")
    rows_per_step = cfg["batch"] * (cfg.get("generations", 1) if online else 1)
    pairs = 2 if task in ("reward", "dpo") else 1
    # Training tokens per step: every real token of every trained sequence (padding not counted; with
    # --lengths fixed there is none); RL: prompt + generated tokens of every sample (the random policy
    # rarely stops before max_new_tokens).
    tokens = rows_per_step * pairs * (cfg["seq"] + cfg["new_tokens"] if online else cfg["seq"])
    if pairs == 2:
        tokens = pair_tokens(cfg, shared=False)
    peak = peak_for(cfg["precision"], peaks) * 1e12
    figures = {}
    for s in sides:
        r = results[s]
        step = median_of(r, "step_s")
        # MFU counts the tokens the model computes: with share_prompt (ours on pairs) each pair's
        # prompt once, so P + 2R tokens instead of 2(P + R); tokens/s counts the pairs' tokens on every side.
        computed = tokens
        if s in ("ours", "ours_packed") and pairs == 2:
            computed = pair_tokens(cfg, shared=True)
        if s == "ours_shared":  # GRPO/RLOO share_prompt: each group's prompt once, P + G*R tokens per prompt
            computed = cfg["batch"] * (cfg["seq"] + cfg["generations"] * cfg["new_tokens"])
        # MFU of each round against the matmul peak its own process measured around the training.
        mfus = [6 * n_params * computed / x["step_s"] / (peak_for(cfg["precision"], x["matmul_peak_tflops"]) * 1e12)
                if "matmul_peak_tflops" in x else None for x in r]  # fmt: skip
        f = {
            "step_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "computed_tokens_per_step": computed,
            "mfu": median_of([{"m": m} for m in mfus], "m") or 6 * n_params * computed / step / peak,
            "mfu_vs_start_peak": 6 * n_params * computed / step / peak, "peak_mib": median_of(r, "peak_mib"),
            "peak_minus_import_mib": median_of(r, "peak_minus_import_mib"), "first_loss": median_of(r, "first_loss"),
            "rounds": r,
        }  # fmt: skip
        if online:
            f["phases"] = {k: median_of([x["phases"] for x in r], k) for k in r[0]["phases"]}
            f["response_len"] = median_of(r, "response_len")
            f["mfu_note"] = "6*N*(prompt+generated tokens)/step time; generation is inside the step, so this is low"
        figures[s] = f
    out = {"settings": cfg, "machine": machine(), "matmul_peak_tflops": peaks, "matmul_params": n_params,
           "figures": figures}  # fmt: skip
    if "ours" in figures and "trl" in figures:
        o, t = figures["ours"], figures["trl"]
        out["ours_over_trl"] = {
            "tokens_per_s": o["tokens_per_s"] / t["tokens_per_s"], "step_time": o["step_s"] / t["step_s"],
            "peak_mib": o["peak_mib"] / t["peak_mib"],
            "peak_minus_import_mib": o["peak_minus_import_mib"] / t["peak_minus_import_mib"],
        }  # fmt: skip
        if "ours_sampler" in figures:  # our side with generation.dtype: a separate, labelled figure
            a = figures["ours_sampler"]
            out["ours_sampler_over_trl"] = {"tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
                                            "step_time": a["step_s"] / t["step_s"], "sampler_dtype": cfg["sampler_dtype"]}  # fmt: skip
            out["ours_sampler_over_ours"] = {"step_time": a["step_s"] / o["step_s"],
                                             "generate": a["phases"]["generate"] / o["phases"]["generate"]}  # fmt: skip
        if "ours_shared" in figures:  # our side with share_prompt (and generation.dtype if given): labelled
            a = figures["ours_shared"]
            base = figures["ours_sampler"] if "ours_sampler" in figures else o
            out["ours_shared_over_trl"] = {"tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
                                           "step_time": a["step_s"] / t["step_s"], "sampler_dtype": cfg.get("sampler_dtype")}  # fmt: skip
            out["ours_shared_over_unshared"] = {"step_time": a["step_s"] / base["step_s"],
                                                "rest": a["phases"]["rest"] / base["phases"]["rest"],
                                                "baseline": "ours_sampler" if "ours_sampler" in figures else "ours"}  # fmt: skip
        if "ours_packed" in figures:  # our side with padding_free: labelled
            a = figures["ours_packed"]
            out["ours_packed_over_trl"] = {"tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
                                           "step_time": a["step_s"] / t["step_s"]}  # fmt: skip
            out["ours_packed_over_ours"] = {"step_time": a["step_s"] / o["step_s"]}
        if "ours_apart" in figures:
            a = figures["ours_apart"]
            out["ours_apart_over_trl"] = {"tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
                                          "step_time": a["step_s"] / t["step_s"]}  # fmt: skip
            out["ours_over_ours_apart"] = {"step_time": o["step_s"] / a["step_s"]}
        if o["first_loss"] is not None and t["first_loss"] is not None:
            diff = abs(o["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
            out["first_loss_check"] = {"ours": o["first_loss"], "trl": t["first_loss"], "rel_diff": diff,
                                       "rtol": LOSS_RTOL, "ok": diff <= LOSS_RTOL}  # fmt: skip
            print(f"[{task}] first-batch loss: ours {o['first_loss']:.6f}  TRL {t['first_loss']:.6f}  "
                  f"rel diff {diff:.2e} ({'OK' if diff <= LOSS_RTOL else 'MISMATCH'})")  # fmt: skip
            for side in ("ours_apart", "ours_packed"):
                a = figures.get(side, {}).get("first_loss")
                if a is not None:
                    out["first_loss_check"][side] = a
                    out["first_loss_check"]["ok"] &= abs(a - t["first_loss"]) / abs(t["first_loss"]) <= LOSS_RTOL
    write_report(task, args.out, out, table(task, out))
    return out


def table(task: str, out: dict) -> str:
    cfg, fig = out["settings"], out["figures"]
    online = task in ("grpo", "rloo")
    head = (f"{task}: h{cfg['hidden']}/{cfg['layers']} layers/V{cfg['vocab']}, batch {cfg['batch']}, seq {cfg['seq']}"
            + (f", {cfg['generations']} samples x {cfg['new_tokens']} new tokens, beta {cfg['beta']}" if online else "")
            + (f" (prompt {pair_prompt_len(cfg)} tokens)" if task in ("reward", "dpo") and cfg.get("lengths", "fixed") == "fixed" else "")
            + (f" (lengths varied: {pair_tokens(cfg, shared=False)} real tokens per batch, no padding counted)"
               if task in ("reward", "dpo") and cfg.get("lengths") == "varied" else "")
            + f", precision {cfg['precision']}"
            + (f", attn_implementation {cfg['attn']} (both sides)" if cfg.get("attn") else "")
            + (", decoder layers compiled (both sides)" if cfg.get("compile") else "")
            + f", {cfg['device']} x{cfg['threads']} threads, "
            f"{cfg['steps']} timed steps x {cfg['rounds']} rounds")  # fmt: skip
    cols = ["side", "s/step", "tokens/s", "MFU", "peak MiB", "peak - imports MiB", "first loss"]
    if online:
        cols[-1:] = ["generate s", "score s", "rest s", "mean response len"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s, f in fig.items():
        name = {"ours": "lightning-rlhf", "ours_apart": "lightning-rlhf, share_prompt off",
                "ours_packed": "lightning-rlhf, padding_free (ours only)",
                "ours_sampler": f"lightning-rlhf, generation.dtype {cfg.get('sampler_dtype')} (ours only)",
                "ours_shared": "lightning-rlhf, share_prompt" + (f" + generation.dtype {cfg['sampler_dtype']}"
                                                                 if cfg.get("sampler_dtype") else "") + " (ours only)"}.get(
            s, f"TRL {TRL_NAME[task]}")  # fmt: skip
        row = [name, fmt(f["step_s"]), fmt(f["tokens_per_s"], ".0f"), fmt(100 * f["mfu"], ".1f") + "%",
               fmt(f["peak_mib"], ".0f"), fmt(f["peak_minus_import_mib"], ".0f")]  # fmt: skip
        if online:
            ph = f["phases"]
            row += [fmt(ph.get("generate")), fmt(ph.get("score")), fmt(ph.get("rest")), fmt(f["response_len"])]
        else:
            row.append(fmt(f["first_loss"], ".6f"))
        lines.append("| " + " | ".join(row) + " |")
    if "ours_over_trl" in out:
        r = out["ours_over_trl"]
        lines += ["", f"ours/TRL: tokens/s {r['tokens_per_s']:.2f}x, step time {r['step_time']:.2f}x, "
                  f"peak memory {r['peak_mib']:.2f}x (minus imports {r['peak_minus_import_mib']:.2f}x)"]  # fmt: skip
    if "ours_sampler_over_trl" in out:
        r, q = out["ours_sampler_over_trl"], out["ours_sampler_over_ours"]
        lines += [f"ours with generation.dtype {r['sampler_dtype']} (not the default comparison): step time "
                  f"{r['step_time']:.2f}x TRL's, {q['step_time']:.2f}x ours at the default (generation {q['generate']:.2f}x)"]  # fmt: skip
    if "ours_shared_over_trl" in out:
        r, q = out["ours_shared_over_trl"], out["ours_shared_over_unshared"]
        lines += [f"ours with share_prompt{' + generation.dtype ' + r['sampler_dtype'] if r['sampler_dtype'] else ''} "
                  f"(not the default comparison): step time {r['step_time']:.2f}x TRL's, {q['step_time']:.2f}x "
                  f"{q['baseline']} without it (forwards + training 'rest' {q['rest']:.2f}x)"]  # fmt: skip
    if "ours_packed_over_trl" in out:
        r = out["ours_packed_over_trl"]
        lines += [f"ours with padding_free (not the default comparison): tokens/s {r['tokens_per_s']:.2f}x TRL's, "
                  f"step time {out['ours_packed_over_ours']['step_time']:.2f}x ours without it"]  # fmt: skip
    if "ours_apart_over_trl" in out:
        lines += [f"share_prompt off/TRL: tokens/s {out['ours_apart_over_trl']['tokens_per_s']:.2f}x; "
                  f"share_prompt on/off step time {out['ours_over_ours_apart']['step_time']:.2f}x"]  # fmt: skip
    return "\n".join(lines)
