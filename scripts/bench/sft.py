"""SFT (completion-only cross-entropy) vs TRL's SFTTrainer.

    python scripts/bench/sft.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed] [--rounds 2]

Writes scripts/bench/results/sft.json and sft.md (see common.py for the figures and MFU).
"""

from compare import parser, run

if __name__ == "__main__":
    run("sft", parser("sft", __doc__).parse_args())
