"""RLHFDataModule under a real lightning.Trainer and standalone."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from _tok import make_tokenizer

from lightning_rlhf.data import DataFormatError, RLHFDataModule, model_inputs

WORDS = "The sea is blue and deep and wide . Hello there how are you".split()


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sft_records(n=20):
    return [{"prompt": " ".join(WORDS[: 1 + i % 5]), "completion": " " + " ".join(WORDS[i % 7 : i % 7 + 2 + i % 9])}
            for i in range(n)]


class TinyModule(L.LightningModule):
    data_kind = "sft"

    def __init__(self):
        super().__init__()
        self.tokenizer = make_tokenizer()
        self.emb = torch.nn.Embedding(len(self.tokenizer), 8)
        self.head = torch.nn.Linear(8, len(self.tokenizer))
        self.seen = []

    def _loss(self, batch):
        kw = model_inputs(batch)
        logits = self.head(self.emb(kw["input_ids"]))[:, :-1]
        mask = batch["loss_mask"][:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), kw["input_ids"][:, 1:], reduction="none")
        return (nll * mask).sum() / mask.sum().clamp(min=1)

    def training_step(self, batch, _):
        self.seen.append(batch["input_ids"].shape)
        return self._loss(batch)

    def validation_step(self, batch, _):
        self.log("val/loss", self._loss(batch), batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_takes_kind_and_tokenizer_from_the_module(tmp_path):
    train = _write(tmp_path / "train.jsonl", _sft_records())
    dm = RLHFDataModule(train, val_split=0.2, batch_size=4)
    module = TinyModule()
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert module.seen and module.seen[0][0] == 4
    assert dm.stats["train"]["examples"] == 16 and dm.stats["val"]["examples"] == 4
    assert len(dm.train_records) == 16 and len(dm.val_records) == 4


def test_standalone_needs_kind_and_tokenizer(tmp_path):
    train = _write(tmp_path / "train.jsonl", _sft_records())
    with pytest.raises(ValueError, match="pass kind=... when using the data module standalone"):
        RLHFDataModule(train).setup("fit")
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    dm = RLHFDataModule(train, kind="sft", tokenizer=str(tok_dir), batch_size=5, packing=True, max_length=32)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert n_tokens == sum(len(ex["input_ids"]) for row in dm.train_examples for ex in row)
    assert dm.stats["train"]["packed_rows"] < 20 and batches[0]["packed"]
    assert batches[0]["input_ids"].shape[1] <= 32
    assert dm.val_dataloader() == []


def test_val_split_is_deterministic_and_val_files_are_used(tmp_path):
    train = _write(tmp_path / "train.jsonl", _sft_records())
    tok_dir = str(tmp_path / "tok")
    make_tokenizer().save_pretrained(tok_dir)

    def split(seed):
        dm = RLHFDataModule(train, val_split=0.25, kind="sft", tokenizer=tok_dir, seed=seed)
        dm.setup()
        return dm.val_records

    assert split(0) == split(0) and split(0) != split(1) and len(split(0)) == 5
    val = _write(tmp_path / "val.jsonl", _sft_records(3))
    dm = RLHFDataModule(train, val_files=val, kind="sft", tokenizer=tok_dir, eval_batch_size=2)
    dm.setup()
    assert len(dm.train_records) == 20 and [len(b["input_ids"]) for b in dm.val_dataloader()] == [2, 1]


def test_preference_and_prompt_kinds(tmp_path):
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    recs = [{"prompt": "The answer is", "chosen": " 4.", "rejected": " 5.", "margin": 1.0, "id": i} for i in range(6)]
    recs.append({"prompt": "The answer is", "chosen": "", "rejected": " 5."})
    train = _write(tmp_path / "pref.jsonl", recs)
    with pytest.raises(DataFormatError, match=r"record 6 \(line 7\): field 'chosen' is empty"):
        RLHFDataModule(train, kind="preference", tokenizer=str(tok_dir)).setup()
    dm = RLHFDataModule(train, kind="preference", tokenizer=str(tok_dir), on_bad_record="skip", batch_size=4,
                        shuffle=False)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 8 and b["index"].tolist() == [0, 1, 2, 3] and dm.stats["train"]["skipped_bad"] == 1
    dm = RLHFDataModule(train, kind="prompt", tokenizer=str(tok_dir), batch_size=3, shuffle=False)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["prompt"] == ["The answer is"] * 3 and b["extra"][0]["id"] == 0 and "chosen" in b["extra"][0]
