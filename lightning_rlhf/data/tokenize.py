"""Records -> token examples (lists of ints), with explicit truncation and bad-record policies.

Examples (plain dicts of Python lists, collated by :mod:`lightning_rlhf.data.collate`):

- sft: ``input_ids``, ``loss_mask`` (1 where ``input_ids[t]`` is a target; never at t=0).
- preference: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions, EOS included),
  ``margin``, ``index``.
- prompt: ``prompt_ids``, ``prompt`` (raw), ``prompt_text`` (templated), ``extra``, ``index``.

Tokenisation rules:

- Conversational records go through ``tokenizer.apply_chat_template``. The completion tokens are
  located by rendering the prompt with ``add_generation_prompt=True`` and the full conversation, and
  checking that the former is a prefix of the latter *in token space*; a template that breaks this
  raises :class:`ChatTemplateError` (whatever ``on_bad_record`` says: the template is at fault, not
  the record).
- Plain text: the prompt gets the tokenizer's leading special tokens (e.g. BOS), prompt and
  completion are tokenised separately and concatenated as is (no separator is inserted).
- EOS is appended to a completion that does not contain it (chat templates often end a turn with
  EOS followed by a newline: then nothing is appended and the newline stays a target).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import Any, Literal

from lightning_rlhf.data.records import DataFormatError, Messages, Where, is_conversational, parse_record

log = logging.getLogger(__name__)

Kind = Literal["sft", "preference", "prompt"]
Truncation = Literal["error", "skip", "truncate"]
OnBadRecord = Literal["error", "skip"]


class ChatTemplateError(DataFormatError):
    """The chat template's rendering of a prompt is not a token prefix of the full conversation."""


class _TooLong(Exception):
    def __init__(self, field: str, n: int, limit_name: str, limit: int):
        self.field, self.n, self.limit_name, self.limit = field, n, limit_name, limit


class Encoder:
    """Turns text and conversations into token ids the same way for every stage."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one (completions must end with EOS)")
        # Leading special tokens the tokenizer adds on its own (e.g. BOS), found by probing.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a", add_special_tokens=True)["input_ids"]
        k = next((i for i in range(len(special)) if special[i : i + len(plain)] == plain), 0)
        self.prefix_ids: list[int] = list(special[:k])

    def text(self, s: str) -> list[int]:
        return list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    def render(self, messages: Messages, generation_prompt: bool) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("conversational records need a tokenizer with a chat_template")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def chat(self, messages: Messages, generation_prompt: bool) -> list[int]:
        # The template writes BOS itself when it wants one: no extra special tokens here.
        return self.text(self.render(messages, generation_prompt)) if messages else []

    def prompt(self, prompt: str | Messages) -> list[int]:
        """Prompt tokens: chat-templated with the generation prompt, or prefix + plain text."""
        if is_conversational(prompt):
            return self.chat(prompt, generation_prompt=True)
        return self.prefix_ids + self.text(prompt)

    def split_chat(self, prompt: Messages, completion: Messages, where: Where, field: str) -> tuple[list[int], list[int]]:
        """Tokens of ``prompt`` (with generation prompt) and of ``completion`` as rendered after it."""
        p = self.chat(prompt, generation_prompt=True)
        full = self.chat(prompt + completion, generation_prompt=False)
        self._check_prefix(p, full, where, field)
        return p, full[len(p) :]

    def _check_prefix(self, p: list[int], full: list[int], where: Where, field: str) -> None:
        if full[: len(p)] != p:
            i = next((j for j, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
            tok = self.tokenizer.convert_ids_to_tokens
            got = tok(full[i : i + 3]) if i < len(full) else "end of text"
            raise ChatTemplateError(
                f"{where}: field '{field}': the chat template's rendering of the prompt "
                f"(add_generation_prompt=True) is not a prefix of its rendering of the full conversation "
                f"in token space, so the completion tokens cannot be located. First difference at token {i}: "
                f"prompt has {tok(p[i : i + 3])}, conversation has {got}. Use a template whose "
                f"generation prompt is exactly what it writes before an assistant message."
            )

    def completion(self, ids: list[int]) -> list[int]:
        return ids if self.eos_token_id in ids else ids + [self.eos_token_id]

    def sft(self, parsed: dict, where: Where, completion_only_loss: bool) -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` of one parsed SFT record."""
        if "messages" in parsed:  # every assistant turn is a completion
            msgs = parsed["messages"]
            full = self.chat(msgs, generation_prompt=False)
            mask = [0] * len(full)
            last_start = 0
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                p = self.chat(msgs[:i], generation_prompt=True)
                f = self.chat(msgs[: i + 1], generation_prompt=False)
                self._check_prefix(p, f, where, "messages")
                self._check_prefix(f, full, where, "messages")
                mask[len(p) : len(f)] = [1] * (len(f) - len(p))
                last_start = len(p)
            ids = full
            if self.eos_token_id not in full[last_start:]:
                ids, mask = full + [self.eos_token_id], mask + [1]
        else:
            prompt, completion = parsed["prompt"], parsed["completion"]
            if prompt is not None and is_conversational(prompt):
                p, c = self.split_chat(prompt, completion, where, "completion")
            else:
                p, c = self.prefix_ids + self.text(prompt or ""), self.text(completion)
            c = self.completion(c)
            ids, mask = p + c, [0] * len(p) + [1] * len(c)
        if not completion_only_loss:
            mask = [1] * len(ids)
        mask[0] = 0  # nothing predicts the first token
        return ids, mask


def _limit(ids: list[int], limit: int, field: str, limit_name: str, truncation: str, keep: str) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if truncation != "truncate":
        raise _TooLong(field, len(ids), limit_name, limit)
    return (ids[len(ids) - limit :] if keep == "end" else ids[:limit]), True


def tokenize_records(
    records: Sequence[dict],
    wheres: Sequence[Where],
    kind: Kind,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: Truncation = "error",
    on_bad_record: OnBadRecord = "error",
    completion_only_loss: bool = True,
    name: str = "data",
) -> tuple[list[dict], dict[str, int]]:
    """Validate and tokenise records for one stage kind.

    Args:
        records, wheres: from :func:`~lightning_rlhf.data.records.read_records`.
        kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
        tokenizer: a Hugging Face tokenizer (``eos_token`` set; ``chat_template`` for conversations).
        max_length: most tokens of prompt + completion.
        max_prompt_length: most prompt tokens (preference and prompt kinds).
        truncation: over-long records raise (``"error"``), are dropped (``"skip"``), or are cut
            (``"truncate"``: the end of the completion; the start of the prompt, keeping its end).
            An SFT record whose prompt leaves no room for a completion token is dropped.
        on_bad_record: invalid records raise (``"error"``) or are dropped and counted (``"skip"``).
        completion_only_loss: SFT loss on completion tokens only (else on every token but the first).
        name: split name for the log line.

    Returns:
        ``(examples, stats)``; stats counts ``records``, ``examples``, ``truncated``,
        ``skipped_too_long``, ``skipped_bad``. Counts of dropped/cut records are logged once.
    """
    enc = Encoder(tokenizer)
    examples: list[dict] = []
    stats = {"records": len(records), "examples": 0, "truncated": 0, "skipped_too_long": 0, "skipped_bad": 0}
    for index, (record, where) in enumerate(zip(records, wheres, strict=True)):
        example, outcome = tokenize_record(record, where, index, kind, enc, max_length=max_length,
                                           max_prompt_length=max_prompt_length, truncation=truncation,
                                           on_bad_record=on_bad_record, completion_only_loss=completion_only_loss)
        if example is None:
            stats[outcome] += 1
            continue
        stats["truncated"] += int(outcome == "truncated")
        examples.append(example)
    stats["examples"] = len(examples)
    log_stats(stats, name, max_length, max_prompt_length)
    return examples, stats


def log_stats(stats: dict[str, int], name: str, max_length: int, max_prompt_length: int) -> None:
    """Log the counts of cut and dropped records once (see :func:`tokenize_records`)."""
    n = stats["records"]
    if stats["truncated"]:
        log.warning("%s: %d of %d records truncated (max_length=%d, max_prompt_length=%d)",
                    name, stats["truncated"], n, max_length, max_prompt_length)
    if stats["skipped_too_long"]:
        log.warning("%s: %d of %d records skipped as too long (max_length=%d, max_prompt_length=%d)",
                    name, stats["skipped_too_long"], n, max_length, max_prompt_length)
    if stats["skipped_bad"]:
        log.warning("%s: %d of %d invalid records skipped (on_bad_record='skip')", name, stats["skipped_bad"], n)


def tokenize_record(
    record: dict,
    where: Where,
    index: int,
    kind: Kind,
    enc: Encoder,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: Truncation,
    on_bad_record: OnBadRecord,
    completion_only_loss: bool,
) -> tuple[dict | None, str]:
    """Validate and tokenise one record (the rules of :func:`tokenize_records`).

    Returns ``(example, "ok" | "truncated")``, or ``(None, "skipped_bad" | "skipped_too_long")`` for a
    record that the policies drop; raises :class:`DataFormatError` for one they do not allow.
    """
    try:
        parsed = parse_record(record, kind, where)
    except ChatTemplateError:
        raise
    except DataFormatError:
        if on_bad_record == "error":
            raise
        return None, "skipped_bad"
    try:
        example, cut = _tokenize_one(parsed, index, where, kind, enc, max_length, max_prompt_length,
                                     truncation, completion_only_loss)
    except _TooLong as e:
        if truncation == "error":
            raise where.error(
                e.field,
                f"is too long: {e.n} tokens > {e.limit_name}={e.limit} (truncation='error'; "
                f"set truncation to 'truncate' or 'skip', or raise {e.limit_name})",
            ) from None
        return None, "skipped_too_long"
    if example is None:
        return None, "skipped_too_long"
    return example, "truncated" if cut else "ok"


def example_length(example: dict) -> int:
    """Tokens of an example (an SFT example's ``input_ids``; prompt + the longer completion otherwise)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["prompt_ids"]) + max(len(example.get("chosen_ids", ())), len(example.get("rejected_ids", ())))


class TokenizedRecords(Sequence):
    """The examples of a :class:`~lightning_rlhf.data.records.Records` sequence, tokenised when asked for.

    :meth:`build` validates and tokenises every record once, streaming (one record in memory at a
    time), and keeps only which records give an example and the example's length (12 bytes each);
    ``examples[i]`` then reads and tokenises its record again, giving exactly what
    :func:`tokenize_records` gives. ``rows`` (from :func:`~lightning_rlhf.data.collate.pack`) turns it
    into packed rows: ``examples[i]`` is then the list of examples of row ``i``.
    """

    def __init__(self, records, kind: Kind, tokenizer: Any, positions: array, lengths: array, options: dict,
                 rows: tuple[array, array] | None = None):
        self.records, self.kind, self.tokenizer = records, kind, tokenizer
        self.positions, self.lengths, self.options = positions, lengths, dict(options)
        self._rows = rows  # (flat example order, row starts + [end])
        self._enc: Encoder | None = None

    @classmethod
    def build(cls, records, kind: Kind, tokenizer: Any, *, name: str = "data",
              **options) -> tuple[TokenizedRecords, dict[str, int]]:
        """Validate and tokenise ``records`` once (as :func:`tokenize_records`, same options), keeping an index."""
        enc = Encoder(tokenizer)
        positions, lengths = array("q"), array("I")
        stats = {"records": len(records), "examples": 0, "truncated": 0, "skipped_too_long": 0, "skipped_bad": 0}
        for index, record in enumerate(records):
            example, outcome = tokenize_record(record, records.where(index), index, kind, enc, **options)
            if example is None:
                stats[outcome] += 1
                continue
            stats["truncated"] += int(outcome == "truncated")
            positions.append(index)
            lengths.append(example_length(example))
        stats["examples"] = len(positions)
        log_stats(stats, name, options["max_length"], options["max_prompt_length"])
        out = cls(records, kind, tokenizer, positions, lengths, options)
        out._enc = enc
        return out, stats

    def packed(self, rows: Sequence[Sequence[int]]) -> TokenizedRecords:
        """Rows of examples (indices into this sequence), each served as one item."""
        order, starts = array("q"), array("q", [0])
        for row in rows:
            order.extend(row)
            starts.append(len(order))
        return TokenizedRecords(self.records, self.kind, self.tokenizer, self.positions, self.lengths,
                                self.options, rows=(order, starts))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_enc": None}

    def __len__(self) -> int:
        return len(self._rows[1]) - 1 if self._rows is not None else len(self.positions)

    def example(self, i: int) -> dict:
        """The ``i``-th example (not row)."""
        if self._enc is None:
            self._enc = Encoder(self.tokenizer)
        index = self.positions[i]
        example, _ = tokenize_record(self.records[index], self.records.where(index), index, self.kind, self._enc,
                                     **self.options)
        assert example is not None, f"{self.records.where(index)} gave an example when indexed and none now"
        return example

    def __getitem__(self, i):
        if isinstance(i, slice):
            if self._rows is not None:
                return [self[j] for j in range(*i.indices(len(self)))]
            return TokenizedRecords(self.records, self.kind, self.tokenizer, self.positions[i], self.lengths[i],
                                    self.options)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if self._rows is None:
            return self.example(i)
        order, starts = self._rows
        return [self.example(order[j]) for j in range(starts[i], starts[i + 1])]


def _tokenize_one(parsed, index, where, kind, enc: Encoder, max_length, max_prompt_length, truncation,
                  completion_only_loss) -> tuple[dict | None, bool]:
    if kind == "sft":
        ids, mask = enc.sft(parsed, where, completion_only_loss)
        field = "messages" if "messages" in parsed else ("completion" if parsed.get("prompt") is not None else "text")
        ids, cut = _limit(ids, max_length, field, "max_length", truncation, keep="start")
        mask = mask[: len(ids)]
        if not any(mask):  # the prompt fills max_length: nothing left to learn from
            return None, cut
        return {"input_ids": ids, "loss_mask": mask}, cut

    if kind == "preference":
        prompt = parsed["prompt"]
        if is_conversational(prompt):
            p, c = enc.split_chat(prompt, parsed["chosen"], where, "chosen")
            p2, r = enc.split_chat(prompt, parsed["rejected"], where, "rejected")
            assert p == p2
        else:
            p, c, r = enc.prompt(prompt), enc.text(parsed["chosen"]), enc.text(parsed["rejected"])
        c, r = enc.completion(c), enc.completion(r)
        p, cut_p = _limit(p, max_prompt_length, "prompt", "max_prompt_length", truncation, keep="end")
        room = max_length - len(p)
        c, cut_c = _limit(c, room, "chosen", "max_length", truncation, keep="start")
        r, cut_r = _limit(r, room, "rejected", "max_length", truncation, keep="start")
        if not c or not r:
            return None, True
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "margin": parsed["margin"],
                "index": index}, cut_p or cut_c or cut_r

    prompt = parsed["prompt"]
    text = enc.render(prompt, generation_prompt=True) if is_conversational(prompt) else prompt
    p, cut = _limit(enc.prompt(prompt), max_prompt_length, "prompt", "max_prompt_length", truncation, keep="end")
    return {"prompt_ids": p, "prompt": prompt, "prompt_text": text, "extra": parsed["extra"], "index": index}, cut
