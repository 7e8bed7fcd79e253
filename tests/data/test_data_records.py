"""Loading (JSONL / JSON / Parquet / datasets folders), format detection and validation errors."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_rlhf.data import (
    DataFormatError,
    Where,
    detect_format,
    load_records,
    parse_record,
    read_records,
)

GOOD = {"prompt": "What is two plus two?", "chosen": " 4.", "rejected": " 5."}
BAD = {"prompt": "What is two plus two?", "chosen": "", "rejected": " 5."}


def _jsonl(path, rows, blank_line_at=None):
    lines = [json.dumps(r) for r in rows]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _first_error(path, kind="preference"):
    records, wheres = read_records(path)
    with pytest.raises(DataFormatError) as e:
        for r, w in zip(records, wheres, strict=True):
            parse_record(r, kind, w)
    return str(e.value)


def test_jsonl_error_names_file_record_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [GOOD] * 17 + [BAD], blank_line_at=3)
    msg = _first_error(path)
    assert msg == f"{path}, record 17 (line 19): field 'chosen' is empty"


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl, record 1 \(line 2\): invalid JSON"):
        read_records(path)
    errors = []
    records, _ = read_records(path, errors=errors)
    assert len(records) == 1 and len(errors) == 1


def test_json_list_error_names_record_and_field(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "x", "chosen": "a"}]))
    assert _first_error(path) == f"{path}, record 2: field 'rejected' is missing"


def test_parquet_error_names_record_and_field(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "p", "chosen": " same", "rejected": " same"}]), path)
    assert _first_error(path) == f"{path}, record 1: field 'rejected' is identical to 'chosen'"
    assert load_records(path)[0] == GOOD


def test_datasets_folder_with_split(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([GOOD] * 3), "test": datasets.Dataset.from_list([GOOD])}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    assert len(load_records(f"{tmp_path / 'ds'}:train")) == 3
    assert len(load_records(tmp_path / "ds", split="test")) == 1
    with pytest.raises(DataFormatError, match="splits"):
        load_records(tmp_path / "ds")
    datasets.Dataset.from_list([GOOD] * 2).save_to_disk(str(tmp_path / "single"))
    assert load_records([tmp_path / "single", f"{tmp_path / 'ds'}:test"]) == [GOOD] * 3


def test_detect_format():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "x", "completion": "y"}) == "prompt_completion"
    assert detect_format({"messages": msgs}) == "messages"
    assert detect_format(GOOD) == "preference"
    assert detect_format({"chosen": "a b", "rejected": "a c"}) == "implicit_preference"
    assert detect_format({"prompt": "x", "answer": 3}) == "prompt"


W = Where("f.jsonl", 0, 1)


def test_implicit_plain_prompt_is_common_prefix_at_whitespace():
    p = parse_record({"chosen": "The answer is 4.", "rejected": "The answer is five."}, "preference", W)
    assert (p["prompt"], p["chosen"], p["rejected"]) == ("The answer is", " 4.", " five.")
    # One text extends the other: the prompt backs off so that neither side is empty.
    p = parse_record({"chosen": "Hello there", "rejected": "Hello there friend"}, "preference", W)
    assert (p["prompt"], p["chosen"], p["rejected"]) == ("Hello", " there", " there friend")


def test_implicit_conversation_prompt_is_all_but_last_assistant_turn():
    user = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    rec = {"chosen": user + [{"role": "assistant", "content": "hello"}],
           "rejected": user + [{"role": "assistant", "content": "go away"}], "margin": 2}
    p = parse_record(rec, "preference", W)
    assert p["prompt"] == user and p["chosen"] == rec["chosen"][-1:] and p["margin"] == 2.0
    rec["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(DataFormatError, match="field 'rejected' must share"):
        parse_record(rec, "preference", W)


@pytest.mark.parametrize(
    "record, kind, match",
    [
        ({"prompt": "p", "completion": ""}, "sft", "field 'completion' is empty"),
        ({"prompt": "p"}, "sft", "field 'completion' is missing"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "sft", "field 'messages' the last message"),
        ({"messages": [{"role": "user"}]}, "sft", "field 'messages' message 0"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "preference", "field 'margin'"),
        ({"prompt": "p", "chosen": "a", "rejected": ["x"]}, "preference", "field 'rejected'"),
        ({"text": "hello"}, "prompt", "field 'prompt' is missing"),
        ({"foo": 1}, "sft", "no known field"),
    ],
)
def test_bad_records(record, kind, match):
    with pytest.raises(DataFormatError, match=match):
        parse_record(record, kind, W)


def test_prompt_kind_keeps_extra_columns():
    p = parse_record({"prompt": "p", "answer": 4, "completion": "ref"}, "prompt", W)
    assert p["extra"] == {"answer": 4, "completion": "ref"}
