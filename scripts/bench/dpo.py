"""DPO (sigmoid loss, beta 0.1, a frozen reference model) vs TRL's DPOTrainer.

    python scripts/bench/dpo.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed] [--rounds 2]

Writes scripts/bench/results/dpo.json and dpo.md (see common.py for the figures and MFU).
"""

from compare import parser, run

if __name__ == "__main__":
    run("dpo", parser("dpo", __doc__).parse_args())
