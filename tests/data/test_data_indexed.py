"""Indexed JSONL (records read and tokenised when served) yields exactly what reading everything into
memory yields: same examples, same batches in the same order for the same seed, same shards."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _tok import make_tokenizer
from torch.utils.data import DataLoader, DistributedSampler

from lightning_rlhf.data import (
    DataFormatError,
    RLHFDataModule,
    index_records,
    pack,
    read_records,
    tokenize_records,
)
from lightning_rlhf.demo.assets import tokenizer_dir

DEMO = "data/demo/reviews"


def eager(files, kind, tok, *, val_split=0.0, seed=0, packing=False, on_bad_record="error", **options):
    """The data module's old path: every record and example in memory (read_records + tokenize_records)."""
    errors = [] if on_bad_record == "skip" else None
    records, wheres = read_records(files, errors=errors)
    val_records, val_wheres = [], []
    if val_split > 0:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_split * len(records)))
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        val_records, val_wheres = [records[i] for i in val_idx], [wheres[i] for i in val_idx]
        records, wheres = [records[i] for i in train_idx], [wheres[i] for i in train_idx]
    options["on_bad_record"] = on_bad_record
    train, stats = tokenize_records(records, wheres, kind, tok, **options)
    val, _ = tokenize_records(val_records, val_wheres, kind, tok, **options)
    stats["records"] += len(errors or [])  # unreadable lines count as bad records
    stats["skipped_bad"] += len(errors or [])
    if packing:
        train = [[train[i] for i in row] for row in pack([len(ex["input_ids"]) for ex in train], options["max_length"])]
    return records, val_records, train, val, stats


def _batches(loader):
    return [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]


def _compare(files, kind, tok, tok_arg, **kw):
    options = {"max_length": kw.pop("max_length", 64), "max_prompt_length": kw.pop("max_prompt_length", 32),
               "truncation": kw.pop("truncation", "error")}
    dm = RLHFDataModule(files, kind=kind, tokenizer=tok_arg, batch_size=3, seed=kw.get("seed", 0),
                        val_split=kw.get("val_split", 0.0), packing=kw.get("packing", False),
                        on_bad_record=kw.get("on_bad_record", "error"), **options)
    dm.setup("fit")
    records, val_records, train, val, stats = eager(files, kind, tok, **options, **kw)
    assert dm.train_records == records and dm.val_records == val_records
    assert list(dm.train_examples) == train and list(dm.val_examples) == val
    assert {k: v for k, v in dm.stats["train"].items() if k != "packed_rows"} == stats
    # The same seeded shuffle gives the same batches in the same order.
    old = DataLoader(train, batch_size=3, shuffle=True, collate_fn=dm._collate,
                     generator=torch.Generator().manual_seed(dm.seed))
    assert _batches(dm.train_dataloader()) == _batches(old)
    # DistributedSampler shards (what the Trainer gives each rank under DDP) are the same examples.
    for rank in range(2):
        new_s = DistributedSampler(dm.train_examples, num_replicas=2, rank=rank, shuffle=True, seed=3)
        old_s = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=3)
        assert [dm.train_examples[i] for i in new_s] == [train[i] for i in old_s]
    return dm


@pytest.mark.parametrize(("name", "kind"), [("sft_train", "sft"), ("pref_train", "preference"),
                                            ("prompts_train", "prompt")])
def test_demo_data_gives_what_the_in_memory_path_gives(name, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dm = _compare(f"{DEMO}/{name}.jsonl", kind, tok, str(tokenizer_dir()), val_split=0.1, seed=5,
                  max_length=128, max_prompt_length=64, truncation="truncate")
    assert dm.stats["train"]["examples"] > 100


WORDS = "the sea is blue and deep and wide . hello there how are you".split()


def _generated(path, n, seed):
    """SFT records of every form, blank lines, a bad JSON line and an invalid record, over two files."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        form = i % 4
        if form == 0:
            rec = {"text": words}
        elif form == 1:
            rec = {"prompt": words[:20] or "x", "completion": " " + words}
        elif form == 2:
            rec = {"messages": [{"role": "user", "content": words[:15] or "x"}, {"role": "assistant", "content": words}]}
        else:
            rec = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": words}]}
        lines.append(json.dumps(rec))
        if i % 17 == 0:
            lines.append("")
    lines.insert(11, "{not json")
    lines.insert(23, json.dumps({"prompt": "", "completion": " x"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("truncation", ["truncate", "skip"])
def test_generated_data_gives_what_the_in_memory_path_gives(tmp_path, packing, truncation):
    tok = make_tokenizer()
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    files = [_generated(tmp_path / "a.jsonl", 120, 0), _generated(tmp_path / "b.jsonl", 50, 1)]
    dm = _compare(files, "sft", tok, tok_dir, val_split=0.2, seed=2, packing=packing, truncation=truncation,
                  on_bad_record="skip", max_length=40)
    assert dm.stats["train"]["skipped_bad"] >= 1 and dm.stats["train"]["skipped_too_long" if truncation == "skip"
                                                                         else "truncated"] >= 1


def test_index_keeps_no_record_and_reads_the_file_when_asked(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(5)) + "\n")
    records = index_records(path)
    assert len(records) == 5 and records[3] == {"text": "record 3"} and str(records.where(3)) == f"{path}, record 3 (line 4)"
    part = records._parts[0]
    assert not any(isinstance(v, (list, dict)) for v in vars(part).values())  # arrays of offsets only
    fresh = index_records(path)
    path.write_text(path.read_text().replace("record 4", "record 44"))
    with pytest.raises(DataFormatError, match="changed after it was read and indexed"):
        fresh[0]


def test_workers_read_the_index_like_the_main_process(tmp_path):
    tok_dir = str(tmp_path / "tok")
    make_tokenizer().save_pretrained(tok_dir)
    files = _generated(tmp_path / "a.jsonl", 60, 4)
    dms = [RLHFDataModule(files, kind="sft", tokenizer=tok_dir, batch_size=4, on_bad_record="skip",
                          num_workers=n, max_length=64, truncation="truncate") for n in (0, 2)]
    for dm in dms:
        dm.setup("fit")
    assert _batches(dms[0].train_dataloader()) == _batches(dms[1].train_dataloader())


def _valid_records(n, seed):
    """Valid SFT records of every form (with non-ASCII text, so that byte and character offsets differ)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 30))) + (" é ✓" if i % 5 == 0 else "")
        out.append([{"text": words}, {"prompt": words[:20] or "x", "completion": " " + words},
                    {"messages": [{"role": "user", "content": words[:15] or "x"},
                                  {"role": "assistant", "content": words}]}][i % 3])
    return out


@pytest.mark.parametrize("source", ["json_array", "json_array_indented", "parquet", "datasets_folder",
                                    "datasets_dict_split"])
def test_json_parquet_and_datasets_sources_are_served_from_an_index(tmp_path, source):
    """JSON arrays are indexed by byte span like JSONL; Parquet and ``datasets`` sources stay in Arrow form.
    Either way no record is held as a Python object, and the data module gives what the in-memory path gives."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightning_rlhf.data.records import ArrowRecords, JsonArrayRecords

    tok = make_tokenizer()
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    records = _valid_records(60, 7)
    if source.startswith("json_array"):
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2 if source.endswith("indented") else None))
        files, part_type = str(path), JsonArrayRecords
    elif source == "parquet":
        # one schema for every form: missing columns are None, which records of the other forms do not have
        files, part_type = str(tmp_path / "data.parquet"), ArrowRecords
        records = [r for r in records if "text" in r]
        pq.write_table(pa.Table.from_pylist(records), files)
    elif source == "datasets_folder":
        records = [r for r in records if "messages" in r]
        datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
        files, part_type = str(tmp_path / "ds"), ArrowRecords
    else:
        records = [r for r in records if "completion" in r]
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:5]),
                              "test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
        files, part_type = str(tmp_path / "dd") + ":test", ArrowRecords
    indexed = index_records(files)
    part = indexed._parts[0]
    assert type(part) is part_type
    assert not any(isinstance(v, (list, dict)) for v in vars(part).values())  # no records as Python objects
    assert list(indexed) == read_records(files)[0] == records
    assert [str(indexed.where(i)) for i in range(3)] == [str(w) for w in read_records(files)[1][:3]]
    _compare(files, "sft", tok, tok_dir, val_split=0.2, seed=1, truncation="truncate", max_length=40)


def test_a_json_file_that_is_not_one_array_of_objects_keeps_its_messages(tmp_path):
    """Anything the index does not take (columns, a non-object element, invalid JSON) is read as before."""
    from lightning_rlhf.data.records import ListRecords

    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"prompt": ["a", "b"], "completion": [" x", " y"]}))
    assert type(index_records(cols)._parts[0]) is ListRecords and index_records(cols)[1] == {"prompt": "b", "completion": " y"}
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataFormatError, match=r"bad.json, record 1: expected a JSON object, got int"):
        index_records(bad)
    bad.write_text('[{"text": "a"}, {"text": "b"')
    with pytest.raises(DataFormatError, match=r"bad.json: invalid JSON at line 1 column 29"):
        index_records(bad)
