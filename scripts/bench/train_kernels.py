"""Our offline stages' training step with other kernels: the attention implementation, and ``torch.compile``.

    python scripts/bench/train_kernels.py [--tasks sft,reward,dpo] [--variants sdpa,eager,compile,eager-compile]
                                    [--precision 32|bf16-mixed] [--device cpu|cuda] [--rounds 2]

Variants of OUR side only (TRL is not run), each in a fresh process, interleaved over rounds:
- ``sdpa``: the default (transformers' ``attn_implementation="sdpa"``);
- ``eager``: ``attn_implementation: eager`` on every model of the stage (``ModelSpec``), i.e. attention as
  two batched matmuls and a softmax;
- ``compile``: ``sdpa`` with every decoder layer compiled in place (regional ``torch.compile``, inductor,
  through the callback ``lightning_rlhf.callbacks.CompileLayers``; the first steps compile, hence
  ``--warmup`` 2 by default);
- ``eager-compile``: both.
Same model, records, batch and steps as the comparisons against TRL (``common.py``). Reports the median
step time, its ratio to the first variant's (``sdpa`` by default) and the first batch's loss (the variants
compute the same loss; the relative difference is printed), and which attention implementation and how
many compiled layers each variant's models really had. Writes ``train_kernels.json`` / ``.md`` under ``--out``
(``scripts/bench/results/train_kernels/<precision>`` by default).
"""

from __future__ import annotations

import argparse
import shutil

from common import (
    RESULTS,
    add_common_args,
    build_assets,
    fmt,
    interleaved,
    machine,
    median_of,
    settings,
    tmpdir,
    write_report,
)
from compare import KINDS

VARIANTS = {"sdpa": {}, "eager": {"attn": "eager"}, "compile": {"compile": True},
            "eager-compile": {"attn": "eager", "compile": True}}  # fmt: skip


def attention_op_ms(cfg: dict) -> dict[str, float]:
    """Forward + backward of attention alone at the runs' shape (batch x 8 heads x seq x hidden / 8, causal),
    milliseconds: torch's SDPA against two batched matmuls and a float32 softmax (what eager attention
    computes), in float32 and bfloat16, on ``cfg["device"]`` with ``cfg["threads"]`` threads."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    b, t, d = cfg["batch"], cfg["seq"], cfg["hidden"] // 8
    causal = torch.ones(t, t, dtype=torch.bool, device=cfg["device"]).tril()

    def matmuls(q, k, v):
        s = (q @ k.transpose(-1, -2) * d**-0.5).masked_fill(~causal, float("-inf"))
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(b, 8, t, d, device=cfg["device"], dtype=dtype, requires_grad=True) for _ in range(3))
        for name, fn in (("sdpa", sdpa), ("matmuls", matmuls)):
            times = []
            for _ in range(13):
                t0 = time.perf_counter()
                fn(q, k, v).sum().backward()
                if cfg["device"] == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{name}_{str(dtype).removeprefix('torch.')}"] = 1e3 * sorted(times[3:])[5]  # median after warmup
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(out=None, warmup=2)
    p.add_argument("--tasks", default="sft,reward,dpo", help="comma-separated: sft, reward, dpo")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    args = p.parse_args()
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    if bad := [t for t in tasks if t not in ("sft", "reward", "dpo")] + [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown task or variant {bad[0]!r} (tasks: sft, reward, dpo; variants: {', '.join(VARIANTS)})")
    out = args.out or RESULTS / "train_kernels" / args.precision
    cfg = settings(args)
    rows, results = [], {}
    for task in tasks:
        work = tmpdir()
        assets = build_assets(cfg, work, kinds=KINDS[task])
        jobs = {v: {"task": task, "side": "ours", "cfg": cfg | VARIANTS[v], "assets": assets} for v in variants}
        print(f"{task}: {', '.join(variants)}", flush=True)
        try:
            res = results[task] = interleaved(jobs, args.rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        base_step, base_loss = median_of(res[variants[0]], "step_s"), res[variants[0]][0]["first_loss"]
        for v in variants:
            step, loss = median_of(res[v], "step_s"), res[v][0]["first_loss"]
            ran = ", ".join(res[v][0].get("attn_implementations", []))
            if n := res[v][0].get("compiled_layers"):
                ran += f", {n} layers compiled"
            rows.append(f"| {task} | {v} ({ran}) | {fmt(step)} | {step / base_step:.2f}x "
                        f"| {fmt(median_of(res[v], 'peak_mib'), '.0f')} "
                        f"| {loss:.5f} ({abs(loss - base_loss) / abs(base_loss):.1e}) |")  # fmt: skip
    op = attention_op_ms(cfg)
    h, layers, vocab = cfg["hidden"], cfg["layers"], cfg["vocab"]
    table = (f"Ours only, h{h}/{layers} layers/V{vocab}, batch {cfg['batch']} x seq {cfg['seq']}, {cfg['precision']}, "
             f"{cfg['device']} x{cfg['threads']} threads, {cfg['steps']} timed steps after {cfg['warmup']} x {cfg['rounds']} "
             f"rounds.\n\n| stage | variant | s/step | vs {variants[0]} | peak MiB | first-batch loss (relative diff) |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows)
             + f"\n\nAttention alone, forward + backward of {cfg['batch']} x 8 heads x {cfg['seq']} x {h // 8} (causal), ms: "
             + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in op.items()))  # fmt: skip
    write_report("train_kernels", out, {"machine": machine(), "settings": cfg, "results": results,
                                        "attention_op_ms": op}, table)  # fmt: skip


if __name__ == "__main__":
    main()
