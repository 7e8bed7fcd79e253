"""RLOO (leave-one-out baseline, KL in the reward) vs TRL's RLOOTrainer; generation as in grpo.py.

    python scripts/bench/rloo.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed] [--rounds 2] [--share-prompt]

``--sampler-dtype`` / ``--share-prompt``: extra labelled sides of ours, as in grpo.py.

Writes scripts/bench/results/rloo.json and rloo.md (see common.py for the figures and MFU).
"""

from compare import parser, run

if __name__ == "__main__":
    run("rloo", parser("rloo", __doc__).parse_args())
