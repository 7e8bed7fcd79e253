"""Peak memory of loading a large JSONL file: records and examples in memory vs. the indexed data module.

    OMP_NUM_THREADS=1 python scripts/bench_data_memory.py --mb 200
    OMP_NUM_THREADS=1 python scripts/bench_data_memory.py --mb 50 --format json   # or parquet, datasets

Writes a seeded SFT JSONL file of about ``--mb`` MB (prompt/completion records of ~2.4 kB, words of
the demo vocabulary), with ``--format`` also the same records as a JSON array, a Parquet file or a
``datasets`` ``save_to_disk`` folder, and loads it in a fresh process per variant, with the demo tokenizer:

- ``in-memory``: what ``RLHFDataModule.setup`` did before the index: ``read_records`` (every record a
  dict) + ``tokenize_records`` (every example's token lists), then a DataLoader over the list;
- ``indexed``: ``RLHFDataModule.setup`` (one streaming pass that validates and tokenises every record
  and keeps an index: byte offsets for JSONL and JSON arrays, the Arrow table for Parquet and
  ``datasets``), then its train DataLoader.

Each child serves ``--batches`` batches and reports its peak RSS (``getrusage``: the kernel's high-water
mark), its RSS after the imports and the tokenizer (the base every variant pays) and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def generate(path: str, mb: float, seed: int = 0) -> int:
    from lightning_rlhf.demo.assets import vocabulary

    words = [w for w in vocabulary() if w.isalpha()]
    rng = random.Random(seed)
    n, size = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            rec = {"prompt": " ".join(rng.choices(words, k=30)), "completion": " " + " ".join(rng.choices(words, k=400))}
            line = json.dumps(rec) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def convert(jsonl: str, fmt: str) -> str:
    """The records of ``jsonl`` as a JSON array, a Parquet file or a ``datasets`` folder (written once)."""
    out = jsonl.rsplit(".", 1)[0] + {"json": ".json", "parquet": ".parquet", "datasets": "_datasets"}[fmt]
    if os.path.exists(out):
        return out
    if fmt == "json":
        with open(jsonl) as src, open(out + ".tmp", "w") as dst:
            dst.write("[\n" + ",\n".join(line.rstrip("\n") for line in src if line.strip()) + "\n]\n")
        os.replace(out + ".tmp", out)
        return out
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    table = pj.read_json(jsonl)
    if fmt == "parquet":
        pq.write_table(table, out)
    else:
        import datasets

        datasets.Dataset(table).save_to_disk(out)
    return out


def child(variant: str, path: str, batches: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from lightning_rlhf.data import RLHFDataModule, SFTCollator, read_records, tokenize_records
    from lightning_rlhf.demo.assets import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if not path.endswith(".jsonl"):  # the readers' imports go into the base too
        import datasets  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    base = _rss_mb()
    options = dict(max_length=512, max_prompt_length=256, truncation="truncate")
    t0 = time.perf_counter()
    if variant == "in-memory":
        records, wheres = read_records(path)
        examples, stats = tokenize_records(records, wheres, "sft", tok, **options)
        loader = DataLoader(examples, batch_size=8, shuffle=True, collate_fn=SFTCollator(tok.pad_token_id),
                            generator=torch.Generator().manual_seed(0))
    else:
        dm = RLHFDataModule(path, kind="sft", tokenizer=str(tokenizer_dir()), batch_size=8, **options)
        dm.setup("fit")
        stats, loader = dm.stats["train"], dm.train_dataloader()
    setup_s = time.perf_counter() - t0
    tokens = 0
    for i, batch in enumerate(loader):
        tokens += int(batch["attention_mask"].sum())
        if i + 1 >= batches:
            break
    return {"variant": variant, "examples": stats["examples"], "base_mb": round(base, 1),
            "peak_mb": round(_rss_mb(), 1), "setup_s": round(setup_s, 1),
            "serve_s": round(time.perf_counter() - t0 - setup_s, 2), "tokens_served": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="size of the generated JSONL file")
    ap.add_argument("--dir", default="/tmp/lightning_rlhf_bench", help="where the file is written (kept, reused)")
    ap.add_argument("--batches", type=int, default=50, help="batches served after setup")
    ap.add_argument("--variants", default="in-memory,indexed")
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "json", "parquet", "datasets"],
                    help="the same records as JSONL, a JSON array, Parquet or a datasets folder")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batches)))
        return
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"sft_{args.mb:g}mb.jsonl")
    if not os.path.exists(path):
        n = generate(path, args.mb)
        print(f"wrote {path}: {n} records, {os.path.getsize(path) / 1e6:.0f} MB")
    if args.format != "jsonl":
        path = convert(path, args.format)
    results = []
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--child", variant, path],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    size = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"\n{args.format}: {path}, {size / 1e6:.0f} MB, {results[0]['examples']} records")
    print(f"{'variant':<10} {'peak RSS MB':>12} {'above base MB':>14} {'setup s':>8} {'serve s':>8}")
    for r in results:
        print(f"{r['variant']:<10} {r['peak_mb']:>12.0f} {r['peak_mb'] - r['base_mb']:>14.0f} {r['setup_s']:>8.1f} "
              f"{r['serve_s']:>8.2f}")
    if len(results) == 2:
        a, b = results
        print(f"peak RSS ratio {a['variant']}/{b['variant']}: {a['peak_mb'] / b['peak_mb']:.1f}x; "
              f"above base: {(a['peak_mb'] - a['base_mb']) / max(b['peak_mb'] - b['base_mb'], 1):.0f}x")


if __name__ == "__main__":
    main()
