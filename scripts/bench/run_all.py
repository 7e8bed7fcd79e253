"""Every comparison of scripts/bench/, one after the other, then README's benchmark table.

    python scripts/bench/run_all.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed]
                                    [--rounds 2] [--only sft,reward,dpo,grpo,rloo,ppo,scaling] [--out DIR]

Each comparison writes ``<out>/<name>.json`` and ``.md`` (default scripts/bench/results/); at the end
``readme_table.py`` regenerates README's table from the JSON files. On a GPU pass ``--device cuda``
(and usually ``--precision bf16-mixed``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import HERE, RESULTS

ALL = ("sft", "reward", "dpo", "grpo", "rloo", "ppo", "scaling")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=",".join(ALL))
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS})")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite README's table")
    args = p.parse_args()
    common = ["--device", args.device, "--precision", args.precision, "--threads", str(args.threads)]
    common += ["--out", args.out] if args.out else []
    failed = []
    for name in args.only.split(","):
        cmd = [sys.executable, str(HERE / f"{name}.py"), *common]
        if name != "scaling":
            cmd += ["--size", args.size, "--rounds", str(args.rounds)]
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        print(f"=== {name}: rc {rc}, {time.perf_counter() - t:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if not args.no_readme:
        subprocess.run([sys.executable, str(HERE / "readme_table.py"), "--results", args.out or str(RESULTS)], check=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
