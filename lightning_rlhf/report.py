"""Write a pipeline's ``report.md`` and ``report.png`` from its ``report.json`` and CSV training logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

# Curves worth a look, per stage: (metric, label). Missing ones are left out.
CURVES = {
    "sft": [("train/loss", "SFT train loss"), ("val/loss", "SFT val loss")],
    "reward": [("val/accuracy", "RM val accuracy"), ("train/accuracy", "RM train accuracy")],
    "ppo": [("rollout/reward_mean", "PPO proxy reward"), ("rollout/diag/gold_reward", "PPO gold reward"), ("rollout/kl", "PPO KL")],
    "dpo": [("train/rewards/margins", "DPO reward margin"), ("val/rewards/accuracies", "DPO val accuracy")],
    "grpo": [("rollout/reward_mean", "GRPO proxy reward"), ("rollout/diag/gold_reward", "GRPO gold reward")],
    "grpo_sentiment": [("rollout/reward_mean", "GRPO exact match (sentiment task)")],
}


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.exists():
        return series
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                try:
                    series.setdefault(k, []).append((step, float(v)))
                except ValueError:
                    continue
    return series


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, dict):
        return f"{x['mean']:+.3f} ± {x['std']:.3f}"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown(report: dict) -> str:
    models = report["models"]
    lo, hi = report["gold_reward_range"]
    lines = [
        "# lightning-rlhf pipeline report",
        "",
        f"Gold reward range [{lo}, {hi}]. Every model sampled on the same held-out prompts with the same settings "
        "and seed; numbers computed by `lightning_rlhf.evaluation`, not copied from training logs.",
        "",
        "| model | gold reward | proxy reward (RM) | KL to SFT | response len | gap closed | prompts × samples |",
        "|---|---|---|---|---|---|---|",
    ]
    gaps = report.get("gap_closed", {})
    for name, m in models.items():
        gap = gaps.get(name)
        lines.append(
            f"| {name} | {_fmt(m['gold_reward'])} | {_fmt(m.get('proxy_reward'))} | {_fmt(m.get('kl_to_sft'))} | "
            f"{m['response_len']:.1f} | {'–' if gap is None else f'{100 * gap:.0f}%'} | {m['n_prompts']} × {m['n_samples'] // max(1, m['n_prompts'])} |"
        )
    rm = report.get("reward_model")
    if rm:
        lines += ["", f"Reward model on held-out pairs: accuracy **{rm['accuracy']:.3f}**, "
                      f"Spearman's rho to gold **{rm['spearman_gold']:.3f}** ({rm.get('n_pairs', '?')} pairs)."]
    for name, extra in report.get("extra", {}).items():
        lines += ["", f"### {name}", "", "| model | gold | prompts × samples |", "|---|---|---|"]
        for mname, m in extra["models"].items():
            lines.append(f"| {mname} | {_fmt(m['gold_reward'])} | {m['n_prompts']} × {m['n_samples'] // max(1, m['n_prompts'])} |")
    lines += ["", "## Models compared", "", "| model | folder | fingerprint |", "|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {m.get('path', '?')} | {str(m.get('fingerprint', '–'))[:19]} |")
    lines += ["", "## Stages", "", "| stage | wall (s) | peak RSS (MB) | output | fingerprint |", "|---|---|---|---|---|"]
    for name, s in report.get("stages", {}).items():
        lines.append(f"| {name} | {s.get('wall_s', '–')} | {s.get('peak_mem_mb', '–')} | {s.get('output', '')}"
                     f"{' (skipped: up to date)' if s.get('skipped') else ''} | {str(s.get('fingerprint', '–'))[:12]} |")
    lines += ["", "## Samples (first sample of the first held-out prompts)", ""]
    names = list(models)
    n_ex = min((len(m.get("examples", [])) for m in models.values()), default=0)
    for i in range(n_ex):
        prompt = models[names[0]]["examples"][i]["prompt"]
        lines += [f"**Prompt:** `{prompt}`", "", "| model | response | gold |", "|---|---|---|"]
        for name in names:
            ex = models[name]["examples"][i]
            gold_key = next((k for k in ex if k not in ("prompt", "response")), None)
            lines.append(f"| {name} | {ex['response'] or '(empty)'} | {_fmt(ex.get(gold_key))} |")
        lines.append("")
    lines += ["![training curves](report.png)", ""]
    return "\n".join(lines)


def plot(report: dict, output_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for stage, curves in CURVES.items():
        series = read_metrics(output_dir / "logs" / stage / "metrics.csv")
        for key, label in curves:
            if series.get(key):
                panels.append((label, series[key]))
    models = report["models"]
    n = len(panels) + 1
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    ax = axes[0][0]
    names = list(models)
    means = [models[k]["gold_reward"]["mean"] for k in names]
    stds = [models[k]["gold_reward"]["std"] for k in names]
    ax.bar(names, means, yerr=stds, color="tab:green", alpha=0.8, capsize=3)
    ax.axhline(report["gold_reward_range"][1], color="k", ls="--", lw=0.8)
    ax.set_title("held-out gold reward")
    for i, (label, pts) in enumerate(panels, start=1):
        ax = axes[i // cols][i % cols]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(label)
        ax.set_xlabel("step")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    out = output_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_report(report: dict, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    (output_dir / "report.md").write_text(markdown(report))
    plot(report, output_dir)
