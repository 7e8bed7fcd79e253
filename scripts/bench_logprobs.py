"""Peak memory and time of `logprobs_from_logits` vs the naive `log_softmax(logits.float()).gather(...)`.

    .venv/bin/python scripts/bench_logprobs.py                 # B=8, T=512, V=32000, fp32 and bf16
    .venv/bin/python scripts/bench_logprobs.py --vocab 128256 --seq 256

How memory is measured (CPU, Linux): every (variant, dtype) runs in a fresh Python process so that
allocator caches and earlier peaks cannot leak between variants. In that process the logits are
built in place (no temporaries), then, right before the call, the kernel's resident-set
high-water mark is reset (`echo 5 > /proc/self/clear_refs`) and the current RSS is read; after the
call, `VmHWM - VmRSS_before` from /proc/self/status is the peak *extra* memory the call needed,
sampled by the kernel itself (no polling thread that could miss a short spike). Where clear_refs is
not writable we fall back to `ru_maxrss - RSS_before`, which is still valid because the set-up
never peaks above the RSS it leaves behind. The fp32 log-probs output (B*T*4 bytes) is included.

"fwd" runs under `torch.no_grad()` (rollout / reference log-probs); "fwd+bwd" runs with
`requires_grad` logits and backpropagates `sum(logprobs)`: the gradient w.r.t. the logits is itself
a (B, T, V) tensor in the logits' dtype and is counted for both variants. Times are the median of
`--repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes_since(before_kib: int, reset_ok: bool) -> int:
    peak_kib = _status_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak_kib - before_kib) * 1024


def _child(args: argparse.Namespace) -> None:
    import torch

    from lightning_rlhf.core import logprobs_from_logits

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    B, T, V = args.batch, args.seq, args.vocab
    logits = torch.empty(B, T, V, dtype=dtype)
    for b in range(B):  # fill row by row: the set-up never needs a second (B, T, V) buffer
        logits[b].normal_().mul_(3.0)
    labels = torch.randint(0, V, (B, T))

    if args.variant == "chunked":

        def fn(x, lbl=labels):
            return logprobs_from_logits(x, lbl)
    else:

        def fn(x, lbl=labels):
            return torch.log_softmax(x.float(), dim=-1).gather(-1, lbl.unsqueeze(-1)).squeeze(-1)

    def call():
        if args.mode == "fwd":
            with torch.no_grad():
                return fn(logits)
        logits.grad = None
        x = logits.requires_grad_()
        out = fn(x)
        out.sum().backward()
        return out

    # load kernels / thread pools on a tiny slice first, so one-off start-up costs are not counted
    small = logits[:1, :2].detach().clone().requires_grad_(args.mode != "fwd")
    fn(small, labels[:1, :2]).sum().backward() if args.mode != "fwd" else fn(small, labels[:1, :2])
    del small
    # peak memory of one call
    reset_ok = _reset_peak()
    before = _status_kib("VmRSS")
    out = call()
    peak = _peak_bytes_since(before, reset_ok)
    checksum = float(out.double().sum())
    del out
    logits.grad = None
    # time: 1 warm-up + repeats
    call()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "time_s": statistics.median(times),
                "checksum": checksum,
                "hwm_reset": reset_ok,
                "logits_bytes": logits.numel() * logits.element_size(),
                "threads": torch.get_num_threads(),
            }
        )
    )


def _run_child(variant: str, dtype: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--dtype", dtype]
    cmd += ["--mode", mode, "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    cmd += ["--repeats", str(args.repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return

    print(
        f"B={args.batch} T={args.seq} V={args.vocab}, CPU, median of {args.repeats} calls, fresh process per row"
    )
    header = (
        f"{'dtype':<5} {'mode':<8} {'logits MiB':>10} | {'naive MiB':>9} {'ours MiB':>8} {'mem ratio':>9} | "
    )
    header += f"{'naive ms':>8} {'ours ms':>8} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        for mode in args.modes:
            naive = _run_child("naive", dtype, mode, args)
            ours = _run_child("chunked", dtype, mode, args)
            rel = abs(naive["checksum"] - ours["checksum"]) / max(1.0, abs(naive["checksum"]))
            print(
                f"{dtype:<5} {mode:<8} {ours['logits_bytes'] / MiB:>10.0f} | "
                f"{naive['peak_bytes'] / MiB:>9.0f} {ours['peak_bytes'] / MiB:>8.0f} "
                f"{naive['peak_bytes'] / max(ours['peak_bytes'], 1):>8.1f}x | "
                f"{naive['time_s'] * 1e3:>8.0f} {ours['time_s'] * 1e3:>8.0f} "
                f"{naive['time_s'] / ours['time_s']:>7.2f}x"
                + ("" if rel < 1e-4 else f"   (checksums differ: rel {rel:.1e})")
            )
    print(
        f"peak = extra resident memory of one call over the RSS before it (kernel VmHWM; "
        f"reset ok: {ours['hwm_reset']}), incl. outputs and, for fwd+bwd, the logits' gradient; "
        f"torch threads: {ours['threads']}"
    )


if __name__ == "__main__":
    main()
