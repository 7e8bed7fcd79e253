"""GRPO (group-normalised advantages, k3 KL in the loss) vs TRL's GRPOTrainer; both on their built-in
transformers-model generation (ours: its KV-cache sampler; TRL: model.generate), no vLLM.

    python scripts/bench/grpo.py [--size mid|small] [--device cpu|cuda] [--precision 32|bf16-mixed] [--rounds 2]
                                 [--sampler-dtype bfloat16]
                                 [--share-prompt]

``--sampler-dtype``: also our side sampling from a low-precision copy of the policy
(``generation.dtype``), reported as its own labelled row (side ``ours_sampler``); ours/TRL stays the default.
``--share-prompt``: also our side with ``share_prompt=True`` (one row per prompt group in the reference and
training forwards; with ``--sampler-dtype``, with that dtype too), its own labelled row (side ``ours_shared``).

Writes scripts/bench/results/grpo.json and grpo.md (see common.py for the figures and MFU).
"""

from compare import parser, run

if __name__ == "__main__":
    run("grpo", parser("grpo", __doc__).parse_args())
