"""PPO: one step split into generate / score / train, and peak memory against SFT with LoRA and TRL.

    python scripts/bench/ppo.py [--size mid|small] [--batch 8] [--prompt-len 32] [--new-tokens 32]
                                [--trl-version 0.29.0 | --trl-version none]

Variants, each in a fresh process (rounds interleaved):

- ``ours_ppo``: our PPO with a LoRA policy whose reference is the adapter-off policy (no copy), the
  critic a value head on the policy's backbone, and a frozen reward model (a sequence classifier).
- ``ours_sft_lora``: our SFT with the same LoRA on the same model, batch of ``batch`` sequences of
  prompt + new tokens: the yardstick of the target "PPO peak memory <= 1.5x SFT with LoRA".
- ``trl_ppo``: the last TRL release with a PPO trainer (TRL 1.x has none; 0.29.0 keeps it as
  ``trl.experimental.ppo.PPOTrainer``), LoRA policy (reference = adapter off), its own full trainable
  value model and the same frozen reward model. It cannot be installed beside TRL 1.16, so its wheel is
  downloaded (``pip download --no-deps``) and unpacked into a cache folder that only its worker puts
  first on ``sys.path``; without network the variant is skipped and the JSON says so.

Same model, prompts, batch, response length (no early EOS: the random policy rarely emits it) and
one PPO epoch of one mini-batch per step on every side. TRL's PPO loop exposes no phase timings, so
its step is one number.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from common import (
    add_common_args,
    build_assets,
    fmt,
    interleaved,
    machine,
    matmul_peak,
    median_of,
    settings,
    tmpdir,
    write_report,
)

CACHE = Path.home() / ".cache" / "lightning-rlhf-bench"


def old_trl(version: str) -> tuple[str | None, str]:
    """Folder with TRL ``version`` unpacked (downloaded once), or None and why not."""
    target = CACHE / f"trl-{version}"
    if (target / "trl" / "__init__.py").exists():
        return str(target), "cached"
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"trl=={version}", "--no-deps", "-d", str(CACHE), "-q"]
    try:
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    except (subprocess.SubprocessError, OSError) as err:
        return None, f"pip download trl=={version} failed: {err}"
    wheels = sorted(CACHE.glob(f"trl-{version}-*.whl"))
    if not wheels:
        return None, f"no wheel for trl=={version}"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(target)
    return str(target), f"downloaded {wheels[0].name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, batch=8, seq=32, steps=2)
    p.set_defaults(rounds=1)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    p.add_argument("--trl-version", default="0.29.0", help="TRL release with PPOTrainer; 'none' to skip")
    args = p.parse_args()
    cfg = settings(args) | {"lora": True, "prompt_len": args.seq}
    # SFT sequences as long as PPO's prompt + response.
    work = tmpdir()
    sft_cfg = cfg | {"seq": args.seq + args.new_tokens}
    assets = build_assets(cfg, work / "ppo", kinds=("prompt", "reward")) | {
        "sft": build_assets(sft_cfg, work / "sft", kinds=("sft",))["sft"]
    }
    peaks = matmul_peak(cfg["device"], cfg["threads"])
    jobs = {
        "ours_ppo": {"task": "ppo", "side": "ours", "cfg": cfg, "assets": assets},
        "ours_sft_lora": {"task": "sft", "side": "ours", "cfg": sft_cfg, "assets": assets},
    }
    trl_note = "skipped (--trl-version none)"
    if args.trl_version != "none" and "trl" in args.sides:
        path, trl_note = old_trl(args.trl_version)
        if path:
            jobs["trl_ppo"] = {"task": "ppo", "side": "trl_old", "cfg": cfg, "assets": assets, "trl_path": path}
    results = {}
    for name, job in jobs.items():  # a failing TRL run is reported, not fatal
        try:
            results.update(interleaved({name: job}, 1))
        except RuntimeError as err:
            print(err)
            trl_note = f"trl=={args.trl_version} failed: {str(err)[-500:]}"
    for _ in range(1, cfg["rounds"]):
        for name in list(results):
            results[name] += interleaved({name: jobs[name]}, 1)[name]
    shutil.rmtree(work, ignore_errors=True)
    figures = {}
    for name, rs in results.items():
        f = {"step_s": median_of(rs, "step_s"), "peak_mib": median_of(rs, "peak_mib"),
             "peak_minus_import_mib": median_of(rs, "peak_minus_import_mib"), "rounds": rs}  # fmt: skip
        if rs[0].get("phases"):
            f["phases"] = {k: median_of([x["phases"] for x in rs], k) for k in rs[0]["phases"]}
        figures[name] = f
    o, s = figures["ours_ppo"], figures["ours_sft_lora"]
    ratios = {"ppo_over_sft_lora_peak": o["peak_mib"] / s["peak_mib"],
              "ppo_over_sft_lora_net_peak": o["peak_minus_import_mib"] / s["peak_minus_import_mib"]}  # fmt: skip
    if "trl_ppo" in figures:
        t = figures["trl_ppo"]
        ratios |= {"ours_over_trl_step": o["step_s"] / t["step_s"], "ours_over_trl_peak": o["peak_mib"] / t["peak_mib"],
                   "ours_over_trl_net_peak": o["peak_minus_import_mib"] / t["peak_minus_import_mib"]}  # fmt: skip
    summary = (f"PPO (LoRA, adapter-off reference, value head on the policy) peak {o['peak_mib']:.0f} MiB = "
               f"{ratios['ppo_over_sft_lora_peak']:.2f}x SFT with LoRA (net of imports "
               f"{ratios['ppo_over_sft_lora_net_peak']:.2f}x; target <= 1.5x)")  # fmt: skip
    if "ours_over_trl_step" in ratios:
        summary += (f"; vs TRL {args.trl_version} PPOTrainer: step {ratios['ours_over_trl_step']:.2f}x, peak "
                    f"{ratios['ours_over_trl_peak']:.2f}x (net {ratios['ours_over_trl_net_peak']:.2f}x)")  # fmt: skip
    else:
        summary += f"; TRL PPO: {trl_note}"
    out = {"settings": cfg, "machine": machine(), "matmul_peak_tflops": peaks, "figures": figures,
           "ratios": ratios, "trl_ppo": trl_note, "summary": summary}  # fmt: skip
    head = (f"ppo: h{cfg['hidden']}/{cfg['layers']} layers/V{cfg['vocab']}, {cfg['batch']} prompts of {cfg['seq']} tokens, "
            f"{cfg['new_tokens']} new tokens, LoRA r16, {cfg['device']} x{cfg['threads']} threads, precision {cfg['precision']}")  # fmt: skip
    lines = [head, "", "| variant | s/step | generate s | score s | forward s | train s | peak MiB | peak - imports MiB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, f in figures.items():
        ph = f.get("phases", {})
        lines.append(f"| {name} | {fmt(f['step_s'])} | {fmt(ph.get('generate'))} | {fmt(ph.get('score'))} | "
                     f"{fmt(ph.get('forward'))} | {fmt(ph.get('train'))} | {fmt(f['peak_mib'], '.0f')} | "
                     f"{fmt(f['peak_minus_import_mib'], '.0f')} |")  # fmt: skip
    lines += ["", summary]
    write_report("ppo", args.out, out, "\n".join(lines))


if __name__ == "__main__":
    main()
