"""scripts/bench/: the FLOP count behind MFU, the equal-length and the ragged records, and real TRL comparisons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

CFG = {"hidden": 128, "layers": 2, "vocab": 300, "seq": 24, "batch": 2, "warmup": 1, "steps": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return common.build_assets(CFG, tmp_path_factory.mktemp("bench"), kinds=("sft", "reward", "preference"))


def test_matmul_params_is_every_parameter_but_the_input_embedding(assets):
    for key, cls in (("policy", AutoModelForCausalLM), ("classifier", AutoModelForSequenceClassification)):
        model = cls.from_pretrained(assets[key])
        expected = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        assert common.matmul_params(assets[key]) == expected, key


def test_every_example_is_exactly_seq_tokens_with_eos(assets):
    from lightning_rlhf.data import RLHFDataModule

    for kind, path in (("sft", assets["sft"]), ("preference", assets["preference"])):
        dm = RLHFDataModule(path, kind=kind, tokenizer=assets["tokenizer"], batch_size=4, max_length=64,
                            max_prompt_length=32, shuffle=False)  # fmt: skip
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape[-1] == CFG["seq"], kind  # no padding: every row is seq long
        assert bool(batch["attention_mask"].bool().all()), kind
        if kind == "preference":  # the prompt (shared by chosen and rejected) is half of each example
            prompt = (batch["loss_mask"] == 0).sum(-1)
            assert prompt.tolist() == [common.pair_prompt_len(CFG)] * len(prompt) == [CFG["seq"] // 2] * len(prompt)


def test_varied_lengths_give_every_batch_the_same_mix_of_lengths_in_another_order(tmp_path):
    """``--lengths varied``: real data's ragged pairs. Every batch holds the same real tokens (what
    tokens/s counts, ``pair_tokens``), padded to the same width, in another order."""
    from lightning_rlhf.data import RLHFDataModule

    cfg = CFG | {"batch": 4, "seq": 48, "steps": 3, "lengths": "varied"}
    paths = common.build_assets(cfg, tmp_path, kinds=("preference",))
    dm = RLHFDataModule(paths["preference"], kind="preference", tokenizer=paths["tokenizer"], batch_size=4,
                        max_length=64, max_prompt_length=48, shuffle=False)  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == cfg["warmup"] + cfg["steps"] + 1
    lengths = [b["attention_mask"].sum(-1).tolist() for b in batches]
    for b, row_lengths in zip(batches, lengths, strict=True):
        assert sum(row_lengths) == common.pair_tokens(cfg, shared=False)  # chosen and rejected rows, real tokens
        assert sorted(row_lengths) == sorted(lengths[0]) and len(set(row_lengths)) > 1  # same mix, ragged
        assert b["input_ids"].shape[-1] == max(row_lengths) <= cfg["seq"]
    assert len({tuple(x) for x in lengths}) > 1  # another order per batch
    prompt, response = common.pair_prompt_len(cfg), cfg["seq"] - common.pair_prompt_len(cfg) - 1
    for p, c, r in common.pair_lengths(cfg):
        assert prompt // 4 <= p <= prompt and response // 8 <= min(c, r) <= max(c, r) <= response
    shared = sum(p + c + r + 2 for p, c, r in common.pair_lengths(cfg))
    assert common.pair_tokens(cfg, shared=True) == shared < common.pair_tokens(cfg, shared=False)


def test_reference_differs_from_policy(assets):
    # DPO's first-batch loss is only a check when policy and reference differ (else it is log 2).
    a = AutoModelForCausalLM.from_pretrained(assets["policy"]).model.layers[0].mlp.up_proj.weight
    b = AutoModelForCausalLM.from_pretrained(assets["reference"]).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(a, b)


@pytest.mark.slow
def test_sft_comparison_runs_both_sides_and_writes_the_readme_table(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "sft.py"), "--size", "small", "--batch", "2", "--seq", "16", "--steps", "1",
           "--rounds", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "sft.json").read_text())
    check = res["first_loss_check"]
    assert check["ok"], check  # both sides computed the same loss on the same first batch
    for side in ("ours", "trl"):
        f = res["figures"][side]
        assert f["step_s"] > 0 and f["peak_mib"] > 0 and 0 < f["mfu"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n")
    subprocess.run([sys.executable, str(BENCH / "readme_table.py"), "--results", str(out), "--readme", str(readme)],
                   check=True, timeout=120)  # fmt: skip
    text = readme.read_text()
    assert "old" not in text and "sft vs TRL SFTTrainer" in text and text.endswith("outro\n")
    assert f"{check['ours']:.5f} / {check['trl']:.5f} (same)" in text


@pytest.mark.slow
def test_reward_comparison_on_ragged_pairs_computes_the_same_loss_packed(tmp_path):
    """Reward model on ragged pairs (TRL pads them): ours packed without padding (``padding_free``) and
    ours padded compute TRL's first-batch loss."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "reward.py"), "--size", "small", "--batch", "4", "--seq", "32", "--steps", "1",
           "--rounds", "1", "--lengths", "varied", "--padding-free", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "reward.json").read_text())
    check = res["first_loss_check"]
    assert check["ok"] and {"ours_apart", "ours_packed"} <= set(check), check
    assert res["figures"]["trl"]["tokens_per_step"] == res["figures"]["ours_packed"]["tokens_per_step"]
    assert "ours_packed_over_trl" in res and "padding_free" in (out / "reward.md").read_text()


@pytest.mark.slow
def test_train_kernels_runs_each_variant_with_its_kernels_and_the_same_loss(tmp_path):
    """``train_kernels.py``: eager attention and compiled decoder layers are really what ran, and they
    compute the default's first-batch loss."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "train_kernels.py"), "--size", "tiny", "--tasks", "reward,dpo", "--variants", "sdpa,eager,compile",
           "--batch", "2",
           "--seq", "24", "--steps", "1", "--warmup", "1", "--rounds", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "train_kernels.json").read_text())["results"]
    for task, layers in (("reward", 2), ("dpo", 4)):  # DPO: the policy's and the reference's layers
        ran = {v: res[task][v][0] for v in ("sdpa", "eager", "compile")}
        assert ran["sdpa"]["attn_implementations"] == ran["compile"]["attn_implementations"] == ["sdpa"], task
        assert ran["eager"]["attn_implementations"] == ["eager"], task
        assert (ran["sdpa"]["compiled_layers"], ran["eager"]["compiled_layers"], ran["compile"]["compiled_layers"]) == (0, 0, layers)
        for v in ("eager", "compile"):
            assert ran[v]["first_loss"] == pytest.approx(ran["sdpa"]["first_loss"], rel=1e-5), (task, v)
    assert "eager (eager)" in (out / "train_kernels.md").read_text()
    op = json.loads((out / "train_kernels.json").read_text())["attention_op_ms"]
    assert set(op) == {"sdpa_float32", "matmuls_float32", "sdpa_bfloat16", "matmuls_bfloat16"} and min(op.values()) > 0
