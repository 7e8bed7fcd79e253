"""Held-out accuracy of a reward model and Spearman's rho of its scores with the demo's gold reward.

    python scripts/eval_reward.py outputs/demo/reward [--pairs data/demo/reviews/pref_val.jsonl]

Prints one JSON line: ``{"accuracy", "spearman", "pairs"}`` (accuracy = share of pairs where the
chosen response scores higher; rho over every chosen and rejected response of the held-out pairs).
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification

    from lightning_rlhf.data import read_records
    from lightning_rlhf.demo.reviews import gold_reward
    from lightning_rlhf.models import load_tokenizer
    from lightning_rlhf.stages.reward import evaluate_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="reward model folder (AutoModelForSequenceClassification)")
    parser.add_argument(
        "--pairs", default="data/demo/reviews/pref_val.jsonl", help="held-out preference records"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    records, _ = read_records(args.pairs)
    result = evaluate_pairs(model, tokenizer, records, gold_reward=gold_reward, batch_size=args.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
