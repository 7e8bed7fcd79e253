"""RewardModule: loss and metrics by hand, last-token scores with pad == eos, learning, export, scoring."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from lightning_rlhf.data import Encoder, RLHFDataModule, pad
from lightning_rlhf.evaluation import spearman
from lightning_rlhf.models import LoraSpec, ModelSpec, load_tokenizer
from lightning_rlhf.stages import RewardModule, score_texts
from lightning_rlhf.stages.common import OptimSpec
from lightning_rlhf.stages.reward import encode_pair, evaluate_pairs

PRODUCTS = ["phone", "laptop", "camera", "watch", "lamp", "chair"]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def separable_records(n: int = 12) -> list[dict]:
    """Chosen praises the product, rejected blames it: a reward model only has to spot the adjective."""
    good, bad = ["great", "good", "lovely"], ["bad", "awful", "poor"]
    recs = []
    for i in range(n):
        p = PRODUCTS[i % len(PRODUCTS)]
        chosen = f"the {p} is {good[i % 3]} ." + (" it works well ." if i % 2 else "")
        rejected = f"the {p} is very {bad[i % 3]} ."
        recs.append(
            {
                "prompt": _user(f"review the {p} ."),
                "chosen": _assistant(chosen),
                "rejected": _assistant(rejected),
            }
        )
    return recs


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir):
    """A tiny Llama (hidden 32, 2 layers, seed 0) with the demo tokenizer (conftest)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in separable_records()))
    return path


def batches(module, pref_file, batch_size: int = 4) -> list[dict]:
    dm = RLHFDataModule(
        str(pref_file),
        kind="preference",
        tokenizer=module.tokenizer,
        batch_size=batch_size,
        shuffle=False,
        max_length=48,
        max_prompt_length=16,
    )
    dm.setup("fit")
    return list(dm.train_dataloader())


def make_module(base_dir, lora: bool = False, lr: float = 1e-2, **kwargs) -> RewardModule:
    spec = ModelSpec(path=str(base_dir), lora=LoraSpec(r=4, alpha=8) if lora else None)
    module = RewardModule(spec, optim=OptimSpec(learning_rate=lr, scheduler="constant"), **kwargs)
    module.configure_model()
    return module


def hand_scores(hf, batch) -> torch.Tensor:
    """Backbone + score head run by hand; the score read at each row's last real token."""
    hidden = hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1  # right padding: last real token
    return hf.score(hidden)[torch.arange(hidden.shape[0]), last, 0]


def test_reward_loss_and_accuracy_match_hand_computation(base_dir, pref_file):
    module = make_module(base_dir, center_coef=0.1)
    batch = batches(module, pref_file, batch_size=4)[0]
    batch["margin"] = torch.tensor([0.0, 0.5, -0.25, 1.0])
    loss, chosen, rejected = module._step(batch)
    with torch.no_grad():
        s = hand_scores(module.model, batch)
    c, r = s[:4].tolist(), s[4:].tolist()
    m = [0.0, 0.5, -0.25, 1.0]
    # -log sigmoid(x) = log(1 + exp(-x)); centering: 0.1 * mean((c + r)^2)
    expected = sum(math.log1p(math.exp(-(ci - ri - mi))) for ci, ri, mi in zip(c, r, m, strict=True)) / 4
    expected += 0.1 * sum((ci + ri) ** 2 for ci, ri in zip(c, r, strict=True)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(chosen.detach(), s[:4], rtol=1e-5, atol=1e-6)

    # Validation metrics over two batches: accuracy, margin and reward mean/std over all 16 scores.
    loader = batches(module, pref_file, batch_size=4)[:2]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, dataloaders=DataLoader(loader, batch_size=None))
    with torch.no_grad():
        scores = [hand_scores(module.model, b) for b in loader]
    cs = torch.cat([x[:4] for x in scores])
    rs = torch.cat([x[4:] for x in scores])
    allr = torch.cat([cs, rs])
    got = trainer.callback_metrics
    assert got["val/accuracy"].item() == pytest.approx((cs > rs).float().mean().item())
    assert got["val/margin_mean"].item() == pytest.approx((cs - rs).mean().item(), abs=1e-5)
    assert got["val/reward_mean"].item() == pytest.approx(allr.mean().item(), abs=1e-5)
    assert got["val/reward_std"].item() == pytest.approx(allr.std(unbiased=False).item(), abs=1e-4)
    assert "val/loss" in got


def test_margin_and_center_options_change_the_loss(base_dir, pref_file):
    module = make_module(base_dir)
    batch = batches(module, pref_file)[0]
    batch["margin"] = torch.ones(4)
    base = module._step(batch)[0].item()
    module.use_margin = False
    assert module._step(batch)[0].item() != pytest.approx(base)
    module.use_margin, module.center_coef = True, 1.0
    assert module._step(batch)[0].item() > base


def test_last_token_score_with_pad_equal_to_eos(base_dir):
    """Right padding with pad == eos: each row's score equals its score computed alone, unpadded."""
    module = make_module(base_dir)
    tok = module.tokenizer
    tok.pad_token = tok.eos_token
    module.model.config.pad_token_id = tok.eos_token_id
    prompts = [_user("review the lamp ."), _user("what do you think of the watch ?"), "review the bag ."]
    responses = ["the lamp is great . it works well .", "bad .", "i like this bag ."]
    batched = score_texts(module.model, tok, prompts, responses, batch_size=3)
    alone = [score_texts(module.model, tok, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # The case is real: rows end in eos and are padded with eos, so pooling at "the last token that is
    # not pad" (transformers' own rule) reads the wrong position.
    enc = Encoder(tok)
    rows = [encode_pair(enc, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert all(row[-1] == tok.eos_token_id for row in rows)
    ids = pad(rows, tok.pad_token_id)
    mask = pad([[1] * len(r) for r in rows], 0, ids.shape[1])
    with torch.no_grad():
        pooled = module.model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert not torch.allclose(pooled, torch.tensor(batched), atol=1e-4)


def test_score_texts_tokenises_like_the_data_layer(base_dir, pref_file):
    module = make_module(base_dir)
    batch = batches(module, pref_file, batch_size=6)[0]
    with torch.no_grad():
        chosen, rejected = module(batch)
    recs = separable_records()[:6]
    prompts = [r["prompt"] for r in recs]
    got = module.score(
        prompts * 2, [r["chosen"][0]["content"] for r in recs] + [r["rejected"] for r in recs], batch_size=4
    )
    assert got == pytest.approx(torch.cat([chosen, rejected]).tolist(), abs=1e-5)


def test_reward_accuracy_rises_on_a_separable_problem(base_dir, pref_file):
    module = make_module(base_dir, lr=3e-3)
    recs = separable_records()
    before = evaluate_pairs(module.model, module.tokenizer, recs)["accuracy"]
    dm = RLHFDataModule(str(pref_file), batch_size=4, max_length=48, max_prompt_length=16)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=15,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    after = evaluate_pairs(module.model, module.tokenizer, recs)["accuracy"]
    assert after == 1.0 and after > before
    assert trainer.callback_metrics["train/accuracy"].item() > 0.5


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_trainable_parameter_changes_after_a_step(base_dir, pref_file, lora):
    module = make_module(base_dir, lora=lora, lr=1e-2)
    trainable = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    if lora:  # the score head is trained in full, as an extra saved module
        assert any("score" in n and "modules_to_save" in n for n in trainable)
        assert all("lora_" in n or "score" in n for n in trainable)
    opt = module.configure_optimizers()["optimizer"]
    batch = batches(module, pref_file)[0]
    # LoRA's B starts at zero, so A gets its first gradient on the second step.
    for _ in range(2 if lora else 1):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    unchanged = [
        n for n, p in module.model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])
    ]
    assert not unchanged


@pytest.mark.parametrize(
    "lora,merge", [(False, True), (True, True), (True, False)], ids=["full", "lora-merged", "lora-adapter"]
)
def test_exported_folder_loads_with_transformers(base_dir, pref_file, tmp_path, lora, merge):
    module = make_module(base_dir, lora=lora, lr=1e-2, merge_lora=merge)
    opt = module.configure_optimizers()["optimizer"]
    batch = batches(module, pref_file)[0]
    module.training_step(batch, 0).backward()
    opt.step()
    with torch.no_grad():
        expected = torch.cat(module(batch))
    out = module.save_pretrained(tmp_path / "rm")
    if merge:
        loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert loaded.config.num_labels == 1
    else:
        from peft import AutoPeftModelForSequenceClassification

        loaded = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    tok = load_tokenizer(out)
    recs = separable_records()[:4]
    got = score_texts(
        loaded,
        tok,
        [r["prompt"] for r in recs] * 2,
        [r["chosen"] for r in recs] + [r["rejected"] for r in recs],
    )
    assert got == pytest.approx(expected.tolist(), abs=1e-4)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=g).float().tolist()  # ties
    y = (torch.tensor(x) + torch.randn(40, generator=g)).tolist()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_score_head_is_seeded_and_loss_is_finite(base_dir, pref_file):
    a, b = make_module(base_dir), make_module(base_dir)
    torch.testing.assert_close(a.model.score.weight, b.model.score.weight)
    loss = a._step(batches(a, pref_file)[0])[0]
    assert torch.isfinite(loss)
