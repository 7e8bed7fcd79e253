"""Reward model (Bradley-Terry on chosen/rejected) vs TRL's RewardTrainer.

    python scripts/bench/reward.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed] [--rounds 2]

Writes scripts/bench/results/reward.json and reward.md (see common.py for the figures and MFU).
"""

from compare import parser, run

if __name__ == "__main__":
    run("reward", parser("reward", __doc__).parse_args())
