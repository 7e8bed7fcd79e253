"""Reading records from disk, detecting their format and validating them.

A record is a plain dict. The formats are TRL's:

============================  =====================================================
format                        fields
============================  =====================================================
language modelling            ``text``
prompt/completion             ``prompt``, ``completion`` (str, or lists of messages)
conversational                ``messages`` (list of ``{"role", "content"}``)
preference (explicit)         ``prompt``, ``chosen``, ``rejected`` (+ ``margin``)
preference (implicit)         ``chosen``, ``rejected`` (full texts or conversations)
prompt-only                   ``prompt``
============================  =====================================================

Any other column is kept as ``extra`` (reward functions receive it).
Every error is a :class:`DataFormatError` naming the file, the record index (and the line for
JSONL) and the field.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_rlhf.errors import UserError

PathLike = str | os.PathLike
Messages = list[dict[str, Any]]

SFT_FIELDS = ("text", "prompt", "completion", "messages")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "margin")
PROMPT_FIELDS = ("prompt",)


ROLES = ("system", "developer", "user", "assistant", "tool")
"""Message roles a chat template understands."""


class DataFormatError(UserError):
    """Bad input data: the message names the file, the record index (line for JSONL) and the field."""


@dataclass(frozen=True)
class Where:
    """Where a record comes from, for error messages: ``data/train.jsonl, record 17 (line 18)``."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}, record {self.index}" + (f" (line {self.line})" if self.line is not None else "")

    def error(self, field: str | None, message: str) -> DataFormatError:
        return DataFormatError(f"{self}: field '{field}' {message}" if field else f"{self}: {message}")


# --------------------------------------------------------------------------------------------- loading


def _split_suffix(path: str) -> tuple[str, str | None]:
    """``"folder:test"`` -> ``("folder", "test")`` when ``folder`` is a directory and the full path is not."""
    if not os.path.exists(path) and ":" in path:
        head, _, split = path.rpartition(":")
        if os.path.isdir(head):
            return head, split
    return path, None


def _decode(raw: bytes, where: Where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise where.error(
            None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1} (save the file as UTF-8)"
        ) from None


def _scan_jsonl(path: str, errors: list[DataFormatError] | None = None):
    """Yield ``(record, where, offset, size)`` of each valid line of a JSONL file: its byte offset and
    length too, so that it can be read again later (:class:`JsonlRecords`). One line in memory at a time."""
    index = 0  # record index: non-blank lines, counted whether valid or not
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = Where(path, index, lineno)
            index += 1
            try:
                record = _parse_line(raw, where)
            except DataFormatError as err:
                if errors is None:
                    raise
                errors.append(err)
                continue
            yield record, where, start, len(raw)


def _parse_line(raw: bytes, where: Where) -> dict:
    line = _decode(raw, where)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise where.error(None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise where.error(None, f"expected a JSON object, got {type(record).__name__}")
    return record


def iter_jsonl(path: str, errors: list[DataFormatError] | None = None):
    """Yield ``(record, where)`` of a JSONL file one line at a time (memory bounded by the longest line)."""
    for record, where, _, _ in _scan_jsonl(path, errors):
        yield record, where


def _read_jsonl(path: str, errors: list[DataFormatError] | None) -> tuple[list[dict], list[Where]]:
    records, wheres = [], []
    for record, where in iter_jsonl(path, errors):
        records.append(record)
        wheres.append(where)
    return records, wheres


def _read_json(path: str, errors: list[DataFormatError] | None) -> tuple[list[dict], list[Where]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(
            f"{path}: line {line}: not valid UTF-8: byte 0x{raw[e.start]:02x} at column {col} (save the file as UTF-8)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: it is really JSONL
            return _read_jsonl(path, errors)
        raise DataFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        # Column-oriented {"prompt": [...], "chosen": [...]}.
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataFormatError(f"{path}: columns have different lengths {sorted(lengths)}")
        data = [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records, wheres = [], []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            err = Where(path, i).error(None, f"expected a JSON object, got {type(record).__name__}")
            if errors is None:
                raise err
            errors.append(err)
            continue
        records.append(record)
        wheres.append(Where(path, i))
    return records, wheres


def _read_parquet(path: str) -> tuple[list[dict], list[Where]]:
    records = _open_parquet(path).to_pylist()
    return records, [Where(path, i) for i in range(len(records))]


def _open_parquet(path: str):
    """The Arrow table of a Parquet file, read batch by batch: ``pq.read_table`` peaks at about 5x the
    table's size while decoding a large row group, batches at about 2.5x (``scripts/bench_data_memory.py``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path, memory_map=True)
    return pa.Table.from_batches(list(f.iter_batches(batch_size=1024, use_threads=False)), schema=f.schema_arrow)


def _read_dataset_folder(path: str, split: str | None) -> tuple[list[dict], list[Where]]:
    ds, label = _open_dataset_folder(path, split)
    records = ds.to_list()
    return records, [Where(label, i) for i in range(len(records))]


def _open_dataset_folder(path: str, split: str | None):
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder (memory-mapped Arrow) and its label."""
    import datasets

    ds = datasets.load_from_disk(path)
    label = path
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise DataFormatError(
                    f"{path}: a DatasetDict with splits {sorted(ds)}; name one as '{path}:<split>' or split=..."
                )
            split = next(iter(ds))
        if split not in ds:
            raise DataFormatError(f"{path}: no split '{split}' (splits: {sorted(ds)})")
        ds, label = ds[split], f"{path}:{split}"
    elif split is not None:
        raise DataFormatError(f"{path}: split '{split}' asked for, but the folder holds a single Dataset")
    return ds, label


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.txt")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".txt", ".csv")


def _is_hub_dataset(spec: str) -> bool:
    """``org/name[@config][:split]`` that is not a local path nor a data file name."""
    from ..hub import is_hub_name

    name = spec.split(":")[0].split("@")[0]
    return not os.path.exists(spec) and not name.endswith(DATA_SUFFIXES) and is_hub_name(name)


def _read_hub_dataset(spec: str, split: str | None) -> tuple[list[dict], list[Where]]:
    """Records of a Hub dataset ``org/name[@config][:split]`` (default split: ``split`` or ``train``):
    its repository snapshot from the HF cache (downloaded when online), read by ``datasets.load_dataset``."""
    ds, label = _open_hub_dataset(spec, split)
    records = ds.to_list()
    return records, [Where(label, i) for i in range(len(records))]


def _open_hub_dataset(spec: str, split: str | None):
    """The ``datasets.Dataset`` of a Hub dataset (Arrow files in the datasets cache) and its label."""
    import datasets

    from ..hub import HubNameError, snapshot

    name, _, spec_split = spec.partition(":")
    name, _, config = name.partition("@")
    split = spec_split or split or "train"
    try:
        folder = snapshot(name, repo_type="dataset", what="dataset")
    except HubNameError as e:
        raise DataFormatError(str(e)) from None
    try:
        ds = datasets.load_dataset(folder, name=config or None, split=split)
    except (ValueError, KeyError) as e:
        raise DataFormatError(f"{spec}: cannot load split {split!r}{f' of config {config!r}' if config else ''}: {e}") from None
    label = f"{name}{f'@{config}' if config else ''}:{split}"
    return ds, label


def read_records(
    paths: PathLike | Sequence[PathLike],
    split: str | None = None,
    errors: list[DataFormatError] | None = None,
) -> tuple[list[dict], list[Where]]:
    """Read records and where each comes from.

    Args:
        paths: a file (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``), a folder written by
            ``datasets``' ``save_to_disk`` (``"folder:split"`` picks a split of a ``DatasetDict``),
            a Hugging Face Hub dataset ``org/name[@config][:split]`` (through the HF cache; offline
            with ``HF_HUB_OFFLINE=1``), or a list of these (concatenated in order).
        split: split of a ``DatasetDict`` folder (when the path does not name one).
        errors: when given, unreadable records (invalid JSON lines, non-objects) are appended to it
            and skipped instead of raising.

    Returns:
        ``(records, wheres)``: the dicts and, for each, its :class:`Where`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    all_records: list[dict] = []
    all_wheres: list[Where] = []
    for p in paths:
        path, path_split = _split_suffix(os.fspath(p))
        if os.path.isdir(path):
            records, wheres = _read_dataset_folder(path, path_split or split)
        elif _is_hub_dataset(os.fspath(p)):
            records, wheres = _read_hub_dataset(os.fspath(p), split)
        elif not os.path.exists(path):
            raise DataFormatError(f"{path}: no such file or folder")
        elif path.endswith(JSONL_SUFFIXES):
            records, wheres = _read_jsonl(path, errors)
        elif path.endswith(".json"):
            records, wheres = _read_json(path, errors)
        elif path.endswith((".parquet", ".pq")):
            records, wheres = _read_parquet(path)
        else:
            raise DataFormatError(f"{path}: unknown file type (expected .jsonl, .json, .parquet or a datasets folder)")
        all_records += records
        all_wheres += wheres
    return all_records, all_wheres


class JsonlRecords:
    """The valid records of one JSONL file as an index (byte offset, length, record number and line of
    each: 20 bytes a record), read again from the file when asked for. Built by one streaming pass
    that checks every line (UTF-8, JSON, an object) and keeps no record."""

    def __init__(self, path: str, errors: list[DataFormatError] | None = None):
        self.path = path
        self.offsets, self.sizes = array("q"), array("I")
        self.indices, self.lines = array("I"), array("I")
        st = os.stat(path)
        for _, where, offset, size in _scan_jsonl(path, errors):
            self.offsets.append(offset)
            self.sizes.append(size)
            self.indices.append(where.index)
            self.lines.append(where.line)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        try:
            if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
                os.close(self._fd)
        except Exception:  # interpreter shutdown
            pass

    def where(self, i: int) -> Where:
        return Where(self.path, self.indices[i], self.lines[i])

    def get(self, i: int) -> dict:
        if self._fd is None or self._pid != os.getpid():
            fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                os.close(fd)
                raise DataFormatError(f"{self.path}: the file changed after it was read and indexed; restart the run")
            self._fd, self._pid = fd, os.getpid()
        raw = os.pread(self._fd, self.sizes[i], self.offsets[i])  # no shared file position: safe in forked workers
        return _parse_line(raw, self.where(i))


class JsonArrayRecords:
    """The records of a ``.json`` file holding one array of objects, as an index of byte spans (12 bytes a
    record), read again from the file when asked for. ``scan`` returns None for any other content (a
    column-oriented object, several values, a non-object element, invalid JSON or UTF-8): the in-memory
    reader then handles the file and gives its messages."""

    def __init__(self, path: str, offsets: array, sizes: array, stamp: tuple[int, int]):
        self.path, self.offsets, self.sizes, self._stamp = path, offsets, sizes, stamp

    @classmethod
    def scan(cls, path: str) -> JsonArrayRecords | None:
        st = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        ascii_only = len(text) == len(raw)  # then character offsets are byte offsets
        del raw  # the text only from here on
        decoder, ws = json.JSONDecoder(), _WHITESPACE.match
        offsets, sizes = array("q"), array("I")
        pos = ws(text, 0).end()
        if not text.startswith("[", pos):
            return None
        pos = ws(text, pos + 1).end()
        byte, last = 0, 0  # byte offset of character `last`
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                try:
                    record, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    return None
                if not isinstance(record, dict):
                    return None
                del record
                if ascii_only:
                    start, stop = pos, end
                else:
                    byte += len(text[last:pos].encode())
                    start, stop = byte, byte + len(text[pos:end].encode())
                    byte, last = stop, end
                offsets.append(start)
                sizes.append(stop - start)
                pos = ws(text, end).end()
                if text.startswith(",", pos):
                    pos = ws(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    return None
        if ws(text, pos).end() != len(text):
            return None
        return cls(path, offsets, sizes, (st.st_size, st.st_mtime_ns))

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> Where:
        return Where(self.path, i)

    def get(self, i: int) -> dict:
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                raise DataFormatError(f"{self.path}: the file changed after it was read and indexed; restart the run")
            f.seek(self.offsets[i])
            return json.loads(f.read(self.sizes[i]))


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class ArrowRecords:
    """The records of a Parquet file (an Arrow table) or of a ``datasets`` Dataset (memory-mapped Arrow
    files), kept in Arrow form: a record becomes a dict only when it is asked for."""

    def __init__(self, table, label: str):
        self.table, self.label = table, label

    def __len__(self) -> int:
        return len(self.table)

    def where(self, i: int) -> Where:
        return Where(self.label, i)

    def get(self, i: int) -> dict:
        if hasattr(self.table, "to_pylist"):  # a pyarrow Table
            return self.table.slice(i, 1).to_pylist()[0]
        return self.table[int(i)]  # a datasets.Dataset


class ListRecords:
    """Records held in memory (column-oriented JSON, or a JSON file given with ``errors`` to collect)."""

    def __init__(self, records: list[dict], wheres: list[Where]):
        self.records, self.wheres = records, wheres

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> Where:
        return self.wheres[i]

    def get(self, i: int) -> dict:
        return self.records[i]


class Records(Sequence):
    """Records of one or more sources, in order, read when asked for: ``records[i]`` is the dict,
    ``records.where(i)`` its :class:`Where`. JSONL files are indexed (:class:`JsonlRecords`), so that
    memory does not grow with their size; other sources are held in memory.
    ``subset(positions)`` is a view on some of them, in the given order."""

    def __init__(self, parts: Sequence[JsonlRecords | ListRecords], positions: array | None = None):
        self._parts = list(parts)
        self._ends = list(itertools.accumulate(len(p) for p in self._parts))
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions) if self._positions is not None else (self._ends[-1] if self._ends else 0)

    def _locate(self, i: int) -> tuple[JsonlRecords | ListRecords, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if self._positions is not None:
            i = self._positions[i]
        k = bisect.bisect_right(self._ends, i)
        return self._parts[k], i - (self._ends[k - 1] if k else 0)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        part, j = self._locate(i)
        return part.get(j)

    def where(self, i: int) -> Where:
        part, j = self._locate(i)
        return part.where(j)

    def subset(self, positions: Sequence[int]) -> Records:
        base = self._positions
        return Records(self._parts, array("q", (base[p] for p in positions) if base is not None else positions))

    def __eq__(self, other) -> bool:
        if isinstance(other, (Records, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None


def index_records(
    paths: PathLike | Sequence[PathLike],
    split: str | None = None,
    errors: list[DataFormatError] | None = None,
) -> Records:
    """What :func:`read_records` reads, as a :class:`Records` sequence: JSONL files are streamed once
    (each line checked, no record kept) into an index of byte offsets and read again when a record is
    asked for; so are JSON files holding an array of objects; Parquet files and ``datasets`` folders or Hub
    datasets stay in Arrow form (memory-mapped for ``datasets``) and a row becomes a dict when asked for.
    Anything else (column-oriented JSON) is read into memory as :func:`read_records` does."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts: list[JsonlRecords | JsonArrayRecords | ArrowRecords | ListRecords] = []
    for p in paths:
        path, path_split = _split_suffix(os.fspath(p))
        is_file = not os.path.isdir(path) and os.path.exists(path)
        part = None
        if os.path.isdir(path):
            part = ArrowRecords(*_open_dataset_folder(path, path_split or split))
        elif _is_hub_dataset(os.fspath(p)):
            part = ArrowRecords(*_open_hub_dataset(os.fspath(p), split))
        elif is_file and path.endswith(JSONL_SUFFIXES):
            part = JsonlRecords(path, errors)
        elif is_file and path.endswith((".parquet", ".pq")):
            part = ArrowRecords(_open_parquet(path), path)
        elif is_file and path.endswith(".json"):
            part = JsonArrayRecords.scan(path)
        parts.append(part if part is not None else ListRecords(*read_records(p, split, errors)))
    return Records(parts)


def load_records(paths: PathLike | Sequence[PathLike], split: str | None = None) -> list[dict]:
    """Read records from JSONL / JSON / Parquet files or ``datasets`` folders (see :func:`read_records`)."""
    return read_records(paths, split)[0]


# ------------------------------------------------------------------------------- format + validation


def detect_format(record: dict) -> str:
    """Name the record's format from its fields.

    Returns one of ``"preference"``, ``"implicit_preference"``, ``"messages"``,
    ``"prompt_completion"``, ``"text"``, ``"prompt"``; raises ``KeyError`` when no known field is there.
    """
    if "chosen" in record or "rejected" in record:
        return "preference" if "prompt" in record else "implicit_preference"
    if "messages" in record:
        return "messages"
    if "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    if "prompt" in record:
        return "prompt"
    raise KeyError(f"no known field (text, prompt, completion, messages, chosen, rejected) in {sorted(record)}")


def is_conversational(value: Any) -> bool:
    """True for a list of messages (what ``apply_chat_template`` takes)."""
    return isinstance(value, list)


def _check_messages(value: Any, where: Where, field: str) -> Messages:
    if not isinstance(value, list):
        raise where.error(field, f"must be a list of messages, got {type(value).__name__}")
    if not value:
        raise where.error(field, "is empty")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise where.error(field, f"message {i} must be a dict with 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ROLES:
            raise where.error(field, f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise where.error(field, f"message {i}: 'content' must be a string, got {type(m['content']).__name__}")
    return value


def _check_text_or_messages(record: dict, where: Where, field: str, *, empty_hint: str = "") -> str | Messages:
    if field not in record or record[field] is None:
        raise where.error(field, "is missing")
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            hint = f" ({empty_hint})" if empty_hint else ""
            raise where.error(field, ("is empty" if not value else "is only whitespace") + hint)
        return value
    if isinstance(value, list):
        return _check_messages(value, where, field)
    raise where.error(field, f"must be a string or a list of messages, got {type(value).__name__}")


def _common_prefix_at_whitespace(a: str, b: str) -> str:
    """Longest common prefix of ``a`` and ``b`` that ends just before a whitespace character.

    The completion then starts with that whitespace, as word-level BPE tokens do (" 4.").
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    # The prefix must stop at a whitespace that both strings have at that place (so that neither
    # side is empty when one text extends the other).
    for cut in range(min(n, len(a) - 1, len(b) - 1), 0, -1):
        if a[cut].isspace() and b[cut].isspace():
            return a[:cut]
    return ""


def parse_record(record: dict, kind: str, where: Where) -> dict:
    """Validate one record for a stage kind and normalise it.

    Returns a dict:

    - ``kind="sft"``: ``prompt`` (str, messages, or ``None`` for ``text``/``messages`` records),
      ``completion`` (str or messages) or ``messages`` (for the ``messages`` format).
    - ``kind="preference"``: ``prompt``, ``chosen``, ``rejected`` (all str or all messages; an
      implicit prompt is extracted), ``margin`` (float).
    - ``kind="prompt"``: ``prompt`` (str or messages), ``extra`` (the other columns).

    Raises:
        DataFormatError: naming the record and the field.
    """
    try:
        fmt = detect_format(record)
    except KeyError as e:
        raise where.error(None, e.args[0]) from None

    if kind == "sft":
        if fmt == "text":
            text = record["text"]
            if not isinstance(text, str):
                raise where.error("text", f"must be a string, got {type(text).__name__}")
            if not text:
                raise where.error("text", "is empty")
            return {"prompt": None, "completion": text}
        if fmt == "messages":
            msgs = _check_messages(record["messages"], where, "messages")
            if msgs[-1]["role"] != "assistant":
                raise where.error("messages", f"the last message must be from the assistant, got '{msgs[-1]['role']}'")
            return {"messages": msgs}
        if fmt == "prompt_completion":
            prompt = _check_text_or_messages(record, where, "prompt", empty_hint="use a 'text' record for text without a prompt")
            completion = _check_text_or_messages(record, where, "completion")
            if is_conversational(prompt) != is_conversational(completion):
                raise where.error("completion", "must be messages when 'prompt' is, a string when it is a string")
            return {"prompt": prompt, "completion": completion}
        raise where.error(
            "completion" if fmt == "prompt" else None,
            f"is missing: a '{fmt}' record cannot be used for SFT (needs text, messages, or prompt+completion)",
        )

    if kind == "preference":
        if fmt not in ("preference", "implicit_preference"):
            missing = "chosen" if "chosen" not in record else "rejected"
            raise where.error(missing, "is missing (a preference record needs chosen and rejected)")
        for field in ("chosen", "rejected"):
            if field not in record or record[field] is None:
                raise where.error(field, "is missing")
        chosen = _check_text_or_messages(record, where, "chosen")
        rejected = _check_text_or_messages(record, where, "rejected")
        if is_conversational(chosen) != is_conversational(rejected):
            raise where.error("rejected", "must have the same type as 'chosen' (both strings or both messages)")
        if chosen == rejected:
            raise where.error("rejected", "is identical to 'chosen'")
        margin = record.get("margin")
        if margin is None:
            margin = 0.0
        elif isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise where.error("margin", f"must be a number, got {type(margin).__name__}")
        if fmt == "preference":
            prompt = _check_text_or_messages(record, where, "prompt", empty_hint="leave 'prompt' out for implicit-prompt pairs")
            if is_conversational(prompt) != is_conversational(chosen):
                raise where.error("chosen", "must be messages when 'prompt' is, a string when it is a string")
        elif is_conversational(chosen):
            # Implicit conversational: all messages but the last assistant turn are the prompt.
            for field, conv in (("chosen", chosen), ("rejected", rejected)):
                if conv[-1]["role"] != "assistant":
                    raise where.error(field, "the last message of an implicit-prompt conversation must be the assistant's")
            if chosen[:-1] != rejected[:-1]:
                raise where.error(
                    "rejected", "must share all messages but the last assistant turn with 'chosen' (implicit prompt)"
                )
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        else:
            prompt = _common_prefix_at_whitespace(chosen, rejected)
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin)}

    if kind == "prompt":
        if "prompt" not in record:
            raise where.error("prompt", "is missing (prompt-only data needs a 'prompt' field)")
        prompt = _check_text_or_messages(record, where, "prompt")
        return {"prompt": prompt, "extra": {k: v for k, v in record.items() if k != "prompt"}}

    raise ValueError(f"unknown kind {kind!r}: expected 'sft', 'preference' or 'prompt'")
