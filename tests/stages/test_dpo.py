"""DPOModule: losses and metrics by hand, the three kinds of reference, every loss type learns, export."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_rlhf.data import RLHFDataModule
from lightning_rlhf.models import LoraSpec, ModelSpec, load_causal_lm
from lightning_rlhf.stages import DPOModule
from lightning_rlhf.stages.common import OptimSpec

PAIRS = [
    ("review the phone .", "the phone is great .", "the phone is bad ."),
    ("review the lamp .", "i love this lamp . it works well .", "i hate this lamp ."),
    ("review the chair .", "the chair is very lovely .", "it broke fast . the chair is awful ."),
    ("review the bag .", "it was worth it .", "the bag is poor ."),
]


def _msg(role, text):
    return [{"role": role, "content": text}]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory, write_jsonl):
    recs = [
        {"prompt": _msg("user", p), "chosen": _msg("assistant", c), "rejected": _msg("assistant", r)}
        for p, c, r in PAIRS
    ]
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", recs)


def make_module(model_dir, lora: bool = False, lr: float = 1e-2, **kwargs) -> DPOModule:
    spec = ModelSpec(path=str(model_dir), lora=LoraSpec(r=4, alpha=8) if lora else None)
    module = DPOModule(spec, optim=OptimSpec(learning_rate=lr, scheduler="constant"), **kwargs)
    module.configure_model()
    return module


def loader(module, pref_file, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    dm = RLHFDataModule(
        str(pref_file),
        kind="preference",
        tokenizer=module.tokenizer,
        batch_size=batch_size,
        shuffle=shuffle,
        max_length=48,
        max_prompt_length=16,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def first_batch(module, pref_file, batch_size: int = 4) -> dict:
    return next(iter(loader(module, pref_file, batch_size)))


def hand_logps(model, batch) -> tuple[list[float], list[int]]:
    """Full log-softmax over the vocabulary, summed over each row's completion tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["loss_mask"][:, 1:].double()
    return (logp * mask).sum(-1).tolist(), mask.sum(-1).long().tolist()


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_and_metrics_match_hand_computation(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir, beta=0.5)
    with torch.no_grad():  # move the policy away from the reference so the numbers are not all 0
        for p in module.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = first_batch(module, pref_file)
    pi, n = hand_logps(module.policy, batch)
    ref, _ = hand_logps(module.reference, batch)
    b = 4
    h = [(pi[i] - pi[b + i]) - (ref[i] - ref[b + i]) for i in range(b)]
    expected = sum(-log_sigmoid(0.5 * x) for x in h) / b
    rc = [0.5 * (pi[i] - ref[i]) for i in range(b)]
    rr = [0.5 * (pi[b + i] - ref[b + i]) for i in range(b)]
    loss, stats = module._loss(batch, "train")
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert stats["rewards/chosen"].item() == pytest.approx(sum(rc) / b, abs=1e-4)
    assert stats["rewards/rejected"].item() == pytest.approx(sum(rr) / b, abs=1e-4)
    assert stats["rewards/margins"].item() == pytest.approx((sum(rc) - sum(rr)) / b, abs=1e-4)
    assert stats["rewards/accuracies"].item() == pytest.approx(
        sum(c > r for c, r in zip(rc, rr, strict=True)) / b
    )
    assert stats["logps/chosen"].item() == pytest.approx(sum(pi[:b]) / b, rel=1e-4)
    assert stats["logps/rejected"].item() == pytest.approx(sum(pi[b:]) / b, rel=1e-4)

    # SimPO: length-averaged policy log-probs, no reference
    simpo = make_module(tiny_model_dir, loss_type="simpo", beta=2.0, simpo_gamma=0.3)
    assert simpo.reference is None
    pi, n = hand_logps(simpo.policy, batch)
    avg = [pi[i] / n[i] for i in range(2 * b)]
    expected = sum(-log_sigmoid(2.0 * (avg[i] - avg[b + i]) - 0.3) for i in range(b)) / b
    assert simpo._loss(batch, "train")[0].item() == pytest.approx(expected, rel=1e-4)

    # ORPO: token-mean NLL of the chosen + odds-ratio term on length-averaged log-probs
    orpo = make_module(tiny_model_dir, loss_type="orpo", beta=0.1)
    assert orpo.reference is None
    nll = -sum(pi[:b]) / sum(n[:b])

    def log_odds(x):
        return x - math.log1p(-math.exp(x))

    expected = nll + sum(-0.1 * log_sigmoid(log_odds(avg[i]) - log_odds(avg[b + i])) for i in range(b)) / b
    assert orpo._loss(batch, "train")[0].item() == pytest.approx(expected, rel=1e-4)

    # RPO: DPO + alpha * NLL of the chosen
    rpo = make_module(tiny_model_dir, rpo_alpha=0.7)
    pi, n = hand_logps(rpo.policy, batch)  # policy == reference here: the DPO term is log 2
    assert rpo._loss(batch, "train")[0].item() == pytest.approx(
        math.log(2) + 0.7 * -sum(pi[:b]) / sum(n[:b]), rel=1e-4
    )


def test_validation_logs_trl_metric_names(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, dataloaders=loader(module, pref_file, 2))
    got = trainer.callback_metrics
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert f"val/{name}" in got, name
    assert got["val/rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)  # policy == reference


def test_dpo_reference_by_disabled_adapter_matches_copy(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir, lora=True)
    assert module.reference is None  # no second copy in memory
    with torch.no_grad():  # a non-zero adapter, so that disabling it matters
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = first_batch(module, pref_file)
    ref = module.reference_logps(batch)
    copy_ = load_causal_lm(str(tiny_model_dir), trainable=False)
    expected, _ = module.completion_logps(copy_, batch)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy, _ = module.completion_logps(module.policy, batch)
    assert not torch.allclose(policy, ref, atol=1e-3)
    module.policy.train()  # the reference pass runs in eval mode and restores the policy's mode
    module.reference_logps(batch)
    assert module.policy.training


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_precomputed_reference_logps_equal_on_the_fly(tiny_model_dir, pref_file, lora):
    module = make_module(tiny_model_dir, lora=lora, precompute_ref_logps=True)
    batches = list(loader(module, pref_file, batch_size=3))
    on_the_fly = [module.reference_logps(b) for b in batches]
    module.precompute_reference_logps({"train": batches})
    assert module.reference is None  # freed: training holds one model
    for b, expected in zip(batches, on_the_fly, strict=True):
        torch.testing.assert_close(module._cached_reference_logps(b, "train"), expected)
    # shuffled batches find their rows by record index
    shuffled = next(iter(loader(module, pref_file, batch_size=4, shuffle=True)))
    by_index = {int(i): k for k, i in enumerate(torch.cat([b["index"] for b in batches]))}
    flat = torch.cat(
        [
            torch.stack([e[: len(b["index"])], e[len(b["index"]) :]], 1)
            for b, e in zip(batches, on_the_fly, strict=True)
        ]
    )
    want = flat[[by_index[int(i)] for i in shuffled["index"]]]
    torch.testing.assert_close(
        module._cached_reference_logps(shuffled, "train"), torch.cat([want[:, 0], want[:, 1]])
    )
    with pytest.raises(RuntimeError, match="no precomputed reference"):
        module._cached_reference_logps({"index": torch.tensor([99])}, "train")


def test_precompute_under_trainer_frees_the_reference_before_training(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir, precompute_ref_logps=True)
    dm = RLHFDataModule(
        str(pref_file), val_files=str(pref_file), batch_size=2, max_length=48, max_prompt_length=16
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module.reference is None
    assert set(module.ref_cache) == {"train", "val"} and not module.ref_cache["train"].isnan().any()
    assert "val/rewards/accuracies" in trainer.callback_metrics


LOSS_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "cdpo": dict(loss_type="sigmoid", label_smoothing=0.1),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "ipo": dict(loss_type="ipo"),
    "hinge": dict(loss_type="hinge"),
    "simpo": dict(loss_type="simpo", beta=2.0),
    "orpo": dict(loss_type="orpo"),
    "rpo": dict(loss_type="sigmoid", rpo_alpha=1.0),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_each_loss_type_trains(tiny_model_dir, pref_file, case):
    """Five steps on one memorisable batch: the loss falls and the policy prefers the chosen."""
    module = make_module(tiny_model_dir, lr=5e-3, **LOSS_CASES[case])
    assert (module.reference is None) == (case in ("simpo", "orpo"))
    opt = module.configure_optimizers()["optimizer"]
    batch = first_batch(module, pref_file)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, stats = module._loss(batch, "train")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final, stats = module._loss(batch, "train")
    assert final.item() < losses[0], losses
    assert stats["rewards/margins"].item() > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_trainable_parameter_changes_after_a_step(tiny_model_dir, pref_file, lora):
    module = make_module(tiny_model_dir, lora=lora, rpo_alpha=1.0)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert before and all(
        not p.requires_grad for p in (module.reference.parameters() if module.reference else [])
    )
    opt = module.configure_optimizers()["optimizer"]
    batch = first_batch(module, pref_file)
    for _ in range(2 if lora else 1):  # LoRA's B starts at zero: A moves from the second step
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    unchanged = [
        n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    assert not unchanged
    if module.reference is not None:  # the reference never moves
        fresh = load_causal_lm(str(tiny_model_dir), trainable=False)
        for (n, p), q in zip(module.reference.named_parameters(), fresh.parameters(), strict=True):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_exported_folder_loads_with_transformers(tiny_model_dir, pref_file, tmp_path, lora):
    module = make_module(tiny_model_dir, lora=lora)
    opt = module.configure_optimizers()["optimizer"]
    batch = first_batch(module, pref_file)
    for _ in range(2):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = module.save_pretrained(tmp_path / "dpo")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").exists()


def test_length_normalise_option_changes_the_loss(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir, loss_type="simpo")
    batch = first_batch(module, pref_file)
    normalised = module._loss(batch, "train")[0].item()
    module.length_normalise = False
    assert module._loss(batch, "train")[0].item() != pytest.approx(normalised)


def test_checkpoint_leaves_out_the_reference(tiny_model_dir, pref_file):
    module = make_module(tiny_model_dir)
    checkpoint = {"state_dict": copy.copy(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: the reference keys are restored


def test_bad_options_raise_early(tiny_model_dir):
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(str(tiny_model_dir), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOModule(str(tiny_model_dir), loss_type="ipo", label_smoothing=0.1)


def test_fit_starts_with_every_registered_module_in_train_mode(tiny_model_dir, pref_file):
    """The frozen reference is not a submodule, so Lightning's "Found N module(s) in eval mode at the
    start of training" warning (issue 12) does not fire; the reference still scores on the device."""
    import warnings

    module = make_module(tiny_model_dir)
    assert module.reference is not None
    assert not any(n.startswith("reference") for n, _ in module.named_modules())
    dm = RLHFDataModule(str(pref_file), batch_size=2, max_length=48, max_prompt_length=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert not any(k.startswith("reference.") for k in module.state_dict())
