"""``RLHFDataModule``: one LightningDataModule for every stage (sft, preference, prompt batches)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.data.collate import PreferenceCollator, PromptCollator, SFTCollator, pack
from lightning_rlhf.data.records import DataFormatError, Records, index_records
from lightning_rlhf.data.tokenize import TokenizedRecords

log = logging.getLogger(__name__)

Paths = str | os.PathLike | Sequence[str]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved and restored through Lightning's interface for
    stateful loaders, ``state_dict`` / ``load_state_dict``: the shuffle generator's state at the start of
    the epoch and the batches already trained on. The Trainer keeps that state in its checkpoints (with
    its loops' state) and hands it back on resume, so a run resumed mid-epoch sees the same order and
    continues with the next batch: N steps straight equal N/2 + resume + N/2. The Fabric runner saves and
    loads the same state.

    ``consumed``: returns the batches of the current epoch the Trainer has processed (the loader itself
    runs one batch ahead: Lightning prefetches); None: count the batches served.
    ``epoch_length``: returns the batches an epoch takes (the Trainer's ``limit_train_batches``); None or
    returning None: ``len(self)``.
    ``before_iter``: called when an iteration starts, before the restored state is read (the data module
    uses it to take a state the Trainer restored after building this loader; see
    ``RLHFDataModule._take_restored_state``).
    Skipping re-collates the skipped batches once (the cost of one partial epoch of data loading).
    """

    def __init__(self, *args, consumed=None, epoch_length=None, before_iter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = consumed
        self._epoch_length = epoch_length
        self._before_iter = before_iter
        self._epoch_rng: torch.Tensor | None = None
        self._started = False  # an iteration has begun (its position is worth saving)
        self._served = 0
        self._resume: dict | None = None

    def __iter__(self):
        if self._before_iter is not None:
            self._before_iter()
        resume, self._resume = self._resume, None
        if resume is not None and self.generator is not None and resume.get("epoch_rng") is not None:
            self.generator.set_state(resume["epoch_rng"])
        self._epoch_rng = self.generator.get_state() if self.generator is not None else None
        self._started, self._served = True, 0
        it = super().__iter__()
        for _ in range(int(resume.get("consumed", 0)) if resume else 0):
            next(it, None)
            self._served += 1
        for batch in it:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        """Where this loader is: ``{"epoch_rng": <generator state at the epoch's start>, "consumed": n}``.
        After the epoch's last batch it is the start of the next epoch (the generator has already drawn
        this epoch's order), so that a resumed run does not replay an empty epoch."""
        consumed = self._consumed() if self._consumed is not None else None
        consumed = self._served if consumed is None else consumed
        length = self._epoch_length() if self._epoch_length is not None else None
        if self._started and consumed >= (length or len(self)):
            return {"epoch_rng": self.generator.get_state() if self.generator is not None else None, "consumed": 0}
        return {"epoch_rng": self._epoch_rng, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        """Start the next iteration where ``state`` (from ``state_dict``) was."""
        self._resume = dict(state)


class RLHFDataModule(L.LightningDataModule):
    """Validates and tokenises records once (streaming), and serves the batches a stage asks for.

    Works under a ``lightning.Trainer`` / ``LightningCLI`` (DDP included: the Trainer adds its
    ``DistributedSampler``) and standalone: call ``dm.setup("fit")`` and use
    ``dm.train_dataloader()`` in your own (e.g. Fabric) loop -- then ``kind`` and ``tokenizer``
    must be given.

    Args:
        train_files: training records: JSONL / JSON / Parquet files or ``datasets`` folders
            (``"folder:split"`` picks a split), or a list of them.
        val_files: validation records (same forms). None: use ``val_split``.
        val_split: fraction of the training records held out for validation when ``val_files``
            is None (deterministic given ``seed``; at least one record when > 0). 0: no validation.
        kind: batch kind: ``"sft"``, ``"preference"`` or ``"prompt"``. None: the
            ``data_kind`` attribute of the Trainer's LightningModule.
        tokenizer: path of a Hugging Face tokenizer folder. None: the ``tokenizer`` attribute
            of the Trainer's LightningModule (a tokenizer or a path).
        batch_size: training batch size (records; with ``packing``, packed rows).
        eval_batch_size: validation batch size. None: ``batch_size``.
        max_length: most tokens of prompt + completion (and the length of a packed row).
        max_prompt_length: most prompt tokens for preference and prompt batches.
        truncation: over-long records: ``"error"`` (raise, naming the record), ``"skip"`` (drop),
            or ``"truncate"`` (cut the completion's end; for prompts keep their end). Counts are
            logged once and kept in ``stats``.
        on_bad_record: invalid records: ``"error"`` (raise, naming file, record and field) or
            ``"skip"`` (drop, count in ``stats``, log once).
        completion_only_loss: SFT ``loss_mask`` covers completion tokens only (incl. EOS); False:
            every token but the first of each example.
        packing: pack SFT training examples into rows of ``max_length`` tokens (first-fit
            decreasing, once at setup); attention never crosses examples (see ``data.model_inputs``).
            Validation batches are not packed.
        shuffle: shuffle training batches each epoch.
        seed: seed of the validation split and of the training shuffle.
        num_workers: DataLoader workers.
        drop_last: drop the last incomplete training batch.

    Attributes (after ``setup``):
        train_records, val_records: the raw records (dicts) of each split, a
            :class:`~lightning_rlhf.data.records.Records` sequence (JSONL files are indexed by byte
            offset and read when a record is asked for, so memory does not grow with the file).
        train_examples, val_examples: the tokenised examples, a
            :class:`~lightning_rlhf.data.tokenize.TokenizedRecords` sequence (validated and tokenised
            once at setup, streaming; each record is read and tokenised again when it is served).
        stats: ``{"train": {...}, "val": {...}}`` with counts ``records``, ``examples``,
            ``truncated``, ``skipped_too_long``, ``skipped_bad`` (and ``packed_rows`` when packing).
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_split: float = 0.0,
        kind: Literal["sft", "preference", "prompt"] | None = None,
        tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation: Literal["error", "skip", "truncate"] = "error",
        on_bad_record: Literal["error", "skip"] = "error",
        completion_only_loss: bool = True,
        packing: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ):
        super().__init__()
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if truncation not in ("error", "skip", "truncate"):
            raise ValueError(f"truncation must be 'error', 'skip' or 'truncate', got {truncation!r}")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if kind not in (None, "sft", "preference", "prompt"):
            raise ValueError(f"kind must be 'sft', 'preference', 'prompt' or None, got {kind!r}")
        self.train_files = train_files
        self.val_files = val_files
        self.val_split = val_split
        self.kind = kind
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.on_bad_record = on_bad_record
        self.completion_only_loss = completion_only_loss
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last

        self.train_records: Records | None = None
        self.val_records: Records | None = None
        self.train_examples: TokenizedRecords | None = None
        self.val_examples: TokenizedRecords | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._collate = None

    # ------------------------------------------------------------------------------- resolution

    def _module_attr(self, name: str, arg: str) -> Any:
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is None or getattr(module, name, None) is None:
            raise ValueError(
                f"RLHFDataModule: `{arg}` is None and there is no Trainer LightningModule with a "
                f"`{name}` attribute to take it from; pass {arg}=... when using the data module standalone"
            )
        return getattr(module, name)

    def _resolve(self) -> tuple[str, Any]:
        kind = self.kind or self._module_attr("data_kind", "kind")
        if kind not in ("sft", "preference", "prompt"):
            raise ValueError(f"data kind must be 'sft', 'preference' or 'prompt', got {kind!r}")
        tok = self.tokenizer if self.tokenizer is not None else self._module_attr("tokenizer", "tokenizer")
        if isinstance(tok, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(os.fspath(tok))
        if tok.pad_token_id is None:
            log.info("tokenizer has no pad token: padding with eos (masks are explicit, so this is safe)")
            tok.pad_token = tok.eos_token
        if kind == "preference" and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}) "
                "to leave room for the completions"
            )
        return kind, tok

    # ------------------------------------------------------------------------------------ setup

    def _read(self, files: Any) -> tuple[Records, int]:
        errors: list[DataFormatError] | None = [] if self.on_bad_record == "skip" else None
        records = index_records(files, errors=errors)
        return records, len(errors or [])

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:  # load and tokenise once
            return
        self.load()

    def load(self, kind: str | None = None, tokenizer: Any = None) -> None:
        """Read, validate and tokenise the records now (what ``setup`` does), with ``kind`` and
        ``tokenizer`` given explicitly (the constructor's values win when they are set).

        The command line calls it before the Trainer starts, so that a mistake in the data is reported
        before anything (logger run, output folder) is created or any model is loaded.
        """
        if self.train_examples is not None:
            return
        saved = self.kind, self.tokenizer
        self.kind = self.kind or kind
        self.tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer
        try:
            kind, tok = self._resolve()
        finally:
            self.kind, self.tokenizer = saved
        self.resolved_kind, self.resolved_tokenizer = kind, tok
        records, unreadable = self._read(self.train_files)
        if self.val_files is not None:
            val_records, val_unreadable = self._read(self.val_files)
        elif self.val_split > 0:
            order = list(range(len(records)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(self.val_split * len(records)))
            val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
            del order
            val_records, records = records.subset(val_idx), records.subset(train_idx)
            val_unreadable = 0
        else:
            val_records, val_unreadable = records.subset([]), 0

        options = dict(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation=self.truncation,
            on_bad_record=self.on_bad_record,
            completion_only_loss=self.completion_only_loss,
        )
        # One streaming pass per split validates and tokenises every record and keeps an index only;
        # the loaders read and tokenise each record again when it is served.
        train_examples, train_stats = TokenizedRecords.build(records, kind, tok, name="train", **options)
        val_examples, val_stats = TokenizedRecords.build(val_records, kind, tok, name="val", **options)
        for stats, n in ((train_stats, unreadable), (val_stats, val_unreadable)):
            stats["records"] += n
            stats["skipped_bad"] += n
        if not train_examples:
            raise DataFormatError(f"{self.train_files}: no usable training records ({train_stats})")

        if kind == "sft" and self.packing:
            rows = pack(train_examples.lengths, self.max_length, "ffd")
            train_examples = train_examples.packed(rows)
            train_stats["packed_rows"] = len(rows)

        self.train_records, self.val_records = records, val_records
        self.train_examples, self.val_examples = train_examples, val_examples
        self.stats = {"train": train_stats, "val": val_stats}
        pad_id = tok.pad_token_id
        self._collate = {
            "sft": SFTCollator(pad_id),
            "preference": PreferenceCollator(pad_id),
            "prompt": PromptCollator(pad_id),
        }[kind]

    # ------------------------------------------------------------------------------ dataloaders

    def _check_setup(self) -> None:
        if self.train_examples is None:
            raise RuntimeError("RLHFDataModule: call setup() before asking for dataloaders")

    def _consumed_in_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _batches_per_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        n = getattr(trainer, "num_training_batches", None) if trainer is not None else None
        return int(n) if isinstance(n, (int, float)) and 0 < n < float("inf") else None

    def _take_restored_state(self) -> None:
        """Give the train loader the position the Trainer restored from a checkpoint, if it still holds it.

        Lightning loads a stateful loader's state when it builds the loader after restoring the checkpoint.
        A module that asks for ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (every
        stage does, for its LR schedule) makes the Trainer build the loader before the restore, and the
        restored state is then left unused (Lightning issue #20550). This runs when the loader starts an
        iteration, before its first batch, and applies that pending state with Lightning's own method
        (a no-op when there is none).
        """
        trainer = getattr(self, "trainer", None)
        fit_loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
        states = getattr(fit_loop, "_combined_loader_states_to_load", None) if fit_loop is not None else None
        if states and fit_loop._combined_loader is not None:
            # Lightning also leaves the state unused when the checkpoint closed an epoch (it is then "not
            # restarting"); ours then holds the next epoch's start (see ResumableDataLoader.state_dict).
            fit_loop._combined_loader._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []

    def train_dataloader(self) -> DataLoader:
        self._check_setup()
        return ResumableDataLoader(
            self.train_examples,
            consumed=self._consumed_in_epoch,
            epoch_length=self._batches_per_epoch,
            before_iter=self._take_restored_state,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(self.seed) if self.shuffle else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        self._check_setup()
        if not self.val_examples:
            return []
        return DataLoader(
            self.val_examples,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )
