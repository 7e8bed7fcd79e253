"""Wall time of help requests in fresh processes, side by side with the imports they cannot avoid.

    OMP_NUM_THREADS=1 python scripts/bench_cli_help.py --runs 5

Each row starts ``--runs`` fresh Python processes (after one warm-up) and reports the median and the
range of their wall times, and the median CPU time (user + system: less sensitive to a busy machine). ``fit --help`` cold runs with the help cache off
(``LIGHTNING_RLHF_HELP_CACHE=0``: LightningCLI builds the parser); warm reads the cache that the
warm-up filled (in a temporary ``XDG_CACHE_HOME``). ``import lightning.pytorch`` is the floor of any
cold ``fit --help``; ``import lightning.pytorch.cli`` (LightningCLI and jsonargparse) that of LightningCLI's
parser: a cold ``fit --help`` above it is this package's modules plus building the parser. The rows run interleaved (one run of each in turn), so that a machine's load
drifts over all of them alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable
CLI = [PY, "-m", "lightning_rlhf.cli"]


def rows(cache: str) -> list[tuple[str, list[str], dict]]:
    off = {"LIGHTNING_RLHF_HELP_CACHE": "0"}
    on = {"LIGHTNING_RLHF_HELP_CACHE": "1", "XDG_CACHE_HOME": cache}
    return [
        ("python -c pass", [PY, "-c", "pass"], off),
        ("import torch", [PY, "-c", "import torch"], off),
        ("import lightning.pytorch", [PY, "-c", "import lightning.pytorch"], off),
        ("import lightning.pytorch.cli", [PY, "-c", "import lightning.pytorch.cli"], off),
        ("lightning-rlhf --help", [*CLI, "--help"], off),
        ("pipeline --help", [*CLI, "pipeline", "--help"], off),
        ("fit --help (cold: cache off)", [*CLI, "fit", "--help"], off),
        ("fit --help (warm cache)", [*CLI, "fit", "--help"], on),
        ("fit --model.help SFTModule (cold)", [*CLI, "fit", "--model.help", "SFTModule"], off),
        ("fit --model.help SFTModule (warm)", [*CLI, "fit", "--model.help", "SFTModule"], on),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings of the row names to run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        todo = [r for r in rows(cache) if not args.only or any(s in r[0] for s in args.only.split(","))]
        times: dict[str, list[float]] = {name: [] for name, _, _ in todo}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in todo}
        for i in range(args.runs + 1):
            for name, cmd, env in todo:
                t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
                dt, r2 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
                if out.returncode != 0:
                    raise SystemExit(f"{name}: exit {out.returncode}\n{out.stderr[-2000:]}")
                if i:  # the first round is the warm-up (and fills the cache)
                    times[name].append(dt)
                    cpu[name].append(r2.ru_utime + r2.ru_stime - r.ru_utime - r.ru_stime)
    print(f"{'command (fresh process)':<36} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7}")
    for name, ts in times.items():
        print(f"{name:<36} {statistics.median(ts):>9.2f} {min(ts):>7.2f} {max(ts):>7.2f} "
              f"{statistics.median(cpu[name]):>7.2f}")


if __name__ == "__main__":
    main()
