"""SFTModule under a real Trainer, a hand-written Fabric loop and W&B offline; LoRA/QLoRA; schedule."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.core.losses import sft_loss
from lightning_rlhf.data import RLHFDataModule, model_inputs
from lightning_rlhf.evaluation import completion_loss
from lightning_rlhf.models import LoraSpec, ModelSpec
from lightning_rlhf.stages import SFTModule
from lightning_rlhf.stages.common import OptimSpec, build_optimizer, build_scheduler, lr_lambda

TRAINER_KW = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, **{**TRAINER_KW, **kw})


def datamodule(file, **kw) -> RLHFDataModule:
    kw.setdefault("batch_size", 8)
    return RLHFDataModule(train_files=str(file), shuffle=False, **kw)


class Record(L.Callback):
    """Per optimiser step: the training loss and the learning rate used."""

    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_trainable_changed_frozen_kept(model, before):
    after = dict(model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable
    unchanged = [n for n in trainable if torch.equal(before[n], after[n].detach())]
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"
    moved = [n for n, p in after.items() if not p.requires_grad and not torch.equal(before[n], p.detach())]
    assert not moved, f"frozen parameters that changed: {moved}"


def _logits(model, tok, texts=("review the phone . the phone is great .", "i love this lamp .")):
    enc = tok(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


# ----------------------------------------------------------------------- memorisation with Trainer

MEMO_STEPS = 30
MEMO_OPTIM = OptimSpec(learning_rate=1e-2, warmup_steps=3, scheduler="cosine", min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def memo_fit(tmp_path_factory, tiny_model_dir, memo_sft_file):
    """One real Trainer fit on 8 records (val = train: memorisation), with validation before/after."""
    tmp = tmp_path_factory.mktemp("sft-fit")
    module = SFTModule(policy=str(tiny_model_dir), optim=MEMO_OPTIM, output_dir=str(tmp / "out"))
    dm = datamodule(memo_sft_file, val_files=str(memo_sft_file), eval_batch_size=3)
    rec = Record()
    val_before = trainer(tmp).validate(module, dm, verbose=False)[0]["val/loss"]
    trainer(tmp, max_steps=MEMO_STEPS, limit_val_batches=0, callbacks=[rec]).fit(module, dm)
    val_after = trainer(tmp).validate(module, dm, verbose=False)[0]["val/loss"]
    return dict(module=module, rec=rec, val_before=val_before, val_after=val_after, out=tmp / "out")


def test_trainer_fit_memorises_train_and_val_loss_fall(memo_fit):
    losses = memo_fit["rec"].losses
    assert len(losses) == MEMO_STEPS
    assert losses[0] > math.log(82) - 1.0  # a random model starts near uniform
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert memo_fit["val_after"] < 0.5 * memo_fit["val_before"]


def test_val_loss_is_token_weighted_over_uneven_batches(memo_fit, memo_sft_file):
    """Batches of 3, 3, 2 records with different token counts: val/loss is the corpus token mean."""
    module = memo_fit["module"]
    want = completion_loss(module.policy, module.tokenizer, str(memo_sft_file), batch_size=8)
    assert memo_fit["val_after"] == pytest.approx(want, rel=1e-4)


def test_lr_follows_warmup_then_cosine_schedule(memo_fit):
    f = lr_lambda(MEMO_OPTIM, MEMO_STEPS)
    want = [MEMO_OPTIM.learning_rate * f(i) for i in range(MEMO_STEPS)]
    assert memo_fit["rec"].lrs == pytest.approx(want, rel=1e-6)


def test_output_dir_loads_with_transformers_and_reproduces_logits(memo_fit, demo_tokenizer):
    out = memo_fit["out"]
    module = memo_fit["module"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == demo_tokenizer.get_vocab()
    assert tok.chat_template == demo_tokenizer.chat_template and tok.eos_token == "</s>"
    got = _logits(model, tok)
    want = _logits(module.policy, module.tokenizer)
    torch.testing.assert_close(got, want)
    # and it is the trained model, not the base
    base = _logits(AutoModelForCausalLM.from_pretrained(module.policy_spec.path), tok)
    assert not torch.allclose(got, base, atol=1e-2)


# --------------------------------------------------------------------------- one step, all params


def _one_step(tmp_path, module, file, steps=1):
    module.configure_model()
    before = _snapshot(module.policy)
    trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(module, datamodule(file, batch_size=4))
    return before


def test_every_parameter_changes_after_one_step(tmp_path, tiny_model_dir, memo_sft_file):
    module = SFTModule(policy=str(tiny_model_dir), optim=OptimSpec(learning_rate=1e-3))
    before = _one_step(tmp_path, module, memo_sft_file)
    assert all(p.requires_grad for p in module.policy.parameters())
    _assert_trainable_changed_frozen_kept(module.policy, before)


def test_lora_sft_changes_only_the_adapter_and_exports_merged(tmp_path, tiny_model_dir, memo_sft_file):
    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8))
    module = SFTModule(policy=spec, optim=OptimSpec(learning_rate=1e-2), output_dir=str(tmp_path / "out"))
    # two steps: lora_B starts at 0, so lora_A only gets a gradient once B has moved
    before = _one_step(tmp_path, module, memo_sft_file, steps=2)
    assert all("lora_" in n for n, p in module.policy.named_parameters() if p.requires_grad)
    _assert_trainable_changed_frozen_kept(module.policy, before)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(
        _logits(merged, module.tokenizer), _logits(module.policy, module.tokenizer), atol=1e-5, rtol=1e-5
    )


def test_qlora_sft_changes_only_the_adapter(tmp_path, tiny_model_dir, memo_sft_file):
    import bitsandbytes as bnb

    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8), quantization="4bit")
    module = SFTModule(policy=spec, optim=OptimSpec(learning_rate=1e-2), output_dir=str(tmp_path / "out"))
    before = _one_step(tmp_path, module, memo_sft_file, steps=2)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())
    _assert_trainable_changed_frozen_kept(module.policy, before)
    assert (tmp_path / "out" / "adapter_config.json").exists()  # a 4-bit base is not merged


class GradNorm(SFTModule):
    """Records the gradient norm the optimiser actually used (after Lightning's clipping)."""

    def configure_optimizers(self):
        out = super().configure_optimizers()
        self.norms = []

        def hook(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            )

        out["optimizer"].register_step_post_hook(hook)
        return out


def test_max_grad_norm_clips_and_none_does_not(tmp_path, tiny_model_dir, memo_sft_file):
    norms = {}
    for clip in (1e-3, None):
        module = GradNorm(policy=str(tiny_model_dir), optim=OptimSpec(max_grad_norm=clip))
        _one_step(tmp_path, module, memo_sft_file)
        norms[clip] = module.norms[0]
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert norms[None] > 0.1


# ------------------------------------------------------------------------------------- Fabric


def test_fabric_loop_drives_training_step(tiny_model_dir, memo_sft_file):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    module = SFTModule(policy=str(tiny_model_dir), optim=OptimSpec(learning_rate=1e-2, scheduler="constant"))
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    model, optimizer = fabric.setup(module, optimizer)
    dm = datamodule(memo_sft_file, kind="sft", tokenizer=str(tiny_model_dir))
    dm.setup("fit")
    loader = fabric.setup_dataloaders(dm.train_dataloader())
    losses = []
    for step in range(20):
        for batch in loader:
            loss = model.training_step(batch, step)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    # the Fabric-trained policy is the module's own: its loss on the data is the last one seen
    module.eval()
    with torch.no_grad():
        batch = next(iter(dm.train_dataloader()))
        final = float(
            sft_loss(module.policy(**model_inputs(batch)).logits, batch["input_ids"], batch["loss_mask"])
        )
    assert final < 0.5 * losses[0]


# ------------------------------------------------------------------------------------- W&B


def read_wandb_records(path):
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 32 KiB blocks, 7-byte
    record headers ``crc32, length, type``; wandb >= 0.20 ships no Python reader and writes no
    ``wandb-summary.json`` for offline runs)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _wait_for_exit(save_dir, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = list((save_dir / "wandb").glob("offline-run-*/*.wandb"))
        assert len(runs) <= 1
        records = read_wandb_records(runs[0]) if runs else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert runs, "no offline-run-*/*.wandb file"
            return records
        time.sleep(0.2)


@pytest.mark.slow
def test_wandb_offline_run_records_train_loss(tmp_path, tiny_model_dir, memo_sft_file):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lightning-rlhf-test", save_dir=str(tmp_path), offline=True)
    module = SFTModule(policy=str(tiny_model_dir), optim=OptimSpec(learning_rate=1e-2))
    rec = Record()
    t = trainer(
        tmp_path, max_steps=3, limit_val_batches=0, logger=logger, log_every_n_steps=1, callbacks=[rec]
    )
    try:
        t.fit(module, datamodule(memo_sft_file, batch_size=4))
    finally:
        logger.experiment.finish()
    # The offline run file is written by wandb's service process, in its own time: wait for the
    # run's exit record (a real user syncs it later the same way).
    records = _wait_for_exit(tmp_path)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    steps = [h for h in history if "train/loss" in h]
    assert [h["trainer/global_step"] for h in steps] == [0, 1, 2]
    assert [h["train/loss"] for h in steps] == pytest.approx(rec.losses, rel=1e-6)
    assert [h["train/lr"] for h in steps] == pytest.approx(rec.lrs, rel=1e-6)


# ------------------------------------------------------------------------------ schedule shapes


def _hand(step, total, warmup, min_ratio, kind):
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    x = min(1.0, (step - warmup) / (total - warmup))
    shape = (1 + math.cos(math.pi * x)) / 2 if kind == "cosine" else 1 - x
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_lambda_matches_hand_formula(kind):
    spec = OptimSpec(warmup_steps=10, scheduler=kind, min_lr_ratio=0.2)
    f = lr_lambda(spec, 110)
    for step in range(130):
        assert f(step) == pytest.approx(_hand(step, 110, 10, 0.2, kind), abs=1e-12), step


def test_lr_schedule_shape():
    spec = OptimSpec(warmup_steps=4, scheduler="cosine", min_lr_ratio=0.1)
    f = lr_lambda(spec, 24)
    vals = [f(s) for s in range(30)]
    assert vals[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up, never 0
    assert vals[4] == 1.0  # peak right after warm-up
    assert vals[14] == pytest.approx(0.55)  # half-way: min + (1 - min) / 2
    assert all(a >= b for a, b in zip(vals[4:], vals[5:], strict=False))  # monotone decay
    assert vals[24:] == pytest.approx([0.1] * 6)  # floor at min ratio, held after the end


def test_scheduler_steps_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    spec = OptimSpec(learning_rate=0.5, warmup_steps=2, scheduler="linear", min_lr_ratio=0.0)
    opt = build_optimizer([p], spec)
    sched = build_scheduler(opt, spec, 6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 / 3, 1.0 / 3, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)
    opt = build_optimizer(model.parameters(), OptimSpec(weight_decay=0.1))
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert [p.shape for p in by_wd[0.1]] == [(3, 3)]
    assert sorted(p.numel() for p in by_wd[0.0]) == [3, 3]  # linear bias, norm bias (frozen weight left out)
