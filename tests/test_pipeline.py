"""End to end: a shortened demo pipeline (every stage a few steps) writes a complete report, and every
stage's folder loads with transformers. Stages run as real `lightning-rlhf fit` child processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_rlhf.pipeline import load_spec, main, override_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHORT = {
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.val_check_interval": None,
    "trainer.enable_progress_bar": False,
    "trainer.callbacks": [],
    "seed_everything": 0,
}


def short_pipeline(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/demo/pipeline.yaml").read_text())
    for stage in cfg["stages"]:
        stage["config"] = str(ROOT / stage["config"])
        stage["args"] = {**stage.get("args", {}), **SHORT}
    for ev in [cfg["evaluation"], *cfg.get("extra_evaluations", {}).values()]:
        ev["max_prompts"] = 4
        ev["sampling"] = {**ev.get("sampling", {}), "num_samples": 2, "max_new_tokens": 8}
        ev["prompt_files"] = str(ROOT / ev["prompt_files"])
        if ev.get("reward_pairs"):
            ev["reward_pairs"] = str(ROOT / ev["reward_pairs"])
    cfg["evaluation"]["models"]["base"] = str(ROOT / cfg["evaluation"]["models"]["base"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = short_pipeline(tmp)
    out = tmp / "out"
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # stage configs name data files relative to the repository
    try:
        main(["--config", str(cfg), "--output_dir", str(out)])
    finally:
        os.chdir(cwd)
    return cfg, out


def test_report_has_every_field(pipeline_run):
    _, out = pipeline_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "ppo", "dpo", "grpo"}
    for name, m in report["models"].items():
        for key in ("gold_reward", "proxy_reward"):
            assert set(m[key]) == {"mean", "std"}, (name, key)
            assert all(isinstance(v, float) for v in m[key].values())
        assert isinstance(m["kl_to_sft"], float) and isinstance(m["response_len"], float)
        assert m["n_prompts"] == 4 and m["n_samples"] == 8
    assert report["models"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    assert report["gold_reward_range"] == [-1.0, 1.0]
    assert 0.0 <= report["reward_model"]["accuracy"] <= 1.0
    assert -1.0 <= report["reward_model"]["spearman_gold"] <= 1.0
    for stage in ("sft", "reward", "ppo", "dpo", "grpo", "grpo_sentiment"):
        s = report["stages"][stage]
        assert s["wall_s"] > 0 and s["peak_mem_mb"] > 50 and Path(s["output"]).is_dir()
    assert "sentiment_task" in report["extra"]
    assert (out / "report.md").read_text().count("| sft |") >= 1
    # the report names the folders and fingerprints of the models it compared
    records = {st: json.loads((out / st / "pipeline_stage.json").read_text()) for st in ("sft", "ppo", "dpo", "grpo")}
    for st, record in records.items():
        assert report["models"][st]["fingerprint"] == record["fingerprint"] == report["stages"][st]["fingerprint"]
        assert f"| {st} | {out / st} | {record['fingerprint'][:19]} |" in (out / "report.md").read_text()
    assert records["ppo"]["inputs"] == {"sft": records["sft"]["fingerprint"],
                                        "reward": report["stages"]["reward"]["fingerprint"]}
    assert (out / "report.png").stat().st_size > 10_000
    # Curves come from each stage's CSV log.
    assert (out / "logs" / "sft" / "metrics.csv").exists()


def test_every_stage_folder_loads_with_transformers(pipeline_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _, out = pipeline_run
    ids = torch.tensor([[4, 59, 65, 53, 6, 5]])
    for stage in ("sft", "ppo", "dpo", "grpo", "grpo_sentiment"):
        model = AutoModelForCausalLM.from_pretrained(out / stage)
        AutoTokenizer.from_pretrained(out / stage)
        assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward")
    assert rm(input_ids=ids).logits.shape == (1, 1)


def test_existing_stages_are_skipped_and_wandb_runs_are_grouped(pipeline_run, capsys):
    cfg, out = pipeline_run
    spec = load_spec(cfg)
    # every stage logged an offline W&B run into the pipeline folder, in one group
    groups = {yaml.safe_load((out / "configs" / f"{s.name}.override.yaml").read_text())["trainer"]["logger"][0]
              ["init_args"]["group"] for s in spec.stages}
    assert len(groups) == 1
    assert list((out / "wandb").glob("offline-run-*"))
    before = {p: p.stat().st_mtime for p in (out / "sft").iterdir()}
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main(["--config", str(cfg), "--output_dir", str(out)])
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert printed.count("is up to date (fingerprint") == len(spec.stages)
    assert {p: p.stat().st_mtime for p in (out / "sft").iterdir()} == before


def test_a_failing_stage_names_itself_and_its_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning_rlhf.stages.SFTModule\n  init_args:\n"
                   "    policy: {path: /nonexistent/model}\n"
                   f"data:\n  train_files: {ROOT / 'data/demo/reviews/sft_val.jsonl'}\n"
                   "trainer: {logger: false, max_steps: 1, enable_progress_bar: false}\n")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"stages": [{"name": "broken", "config": str(bad)}],
                                    "evaluation": {"models": {}}}))
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(pipe), "--output_dir", str(tmp_path / "out")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "stage 'broken' failed" in err and str(bad) in err


def test_override_config_wires_earlier_outputs(tmp_path):
    spec = load_spec(ROOT / "configs/demo/pipeline.yaml")
    ppo = next(s for s in spec.stages if s.name == "ppo")
    cfg = override_config(ppo, tmp_path, "g", "p")
    init = cfg["model"]["init_args"]
    assert init["policy"]["path"] == str(tmp_path / "sft")
    assert init["reward_model"] == str(tmp_path / "reward")
    assert init["output_dir"] == str(tmp_path / "ppo")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "pipe.yaml: no such file"),
        ("stages:\n  - {name: sft, config: [\n", "pipe.yaml: not valid YAML at line 3, column 1: expected the node content, but found '<stream end>'"),
        ("- just a list\n", "pipe.yaml: expected a mapping with `stages` (and `evaluation`), got list"),
        ("stages: []\nwandb_projet: x\n", "pipe.yaml: unknown key 'wandb_projet'; did you mean wandb_project?"),
        ("stages:\n  - {name: sft, config: configs/demo/nope.yaml}\n",
         "pipe.yaml: stage 'sft': config configs/demo/nope.yaml does not exist"),
    ],
    ids=["missing", "bad_yaml", "not_a_mapping", "unknown_key", "missing_stage_config"],
)
def test_a_bad_pipeline_config_is_one_line(tmp_path, capsys, monkeypatch, text, expected):
    monkeypatch.chdir(ROOT)
    pipe = tmp_path / "pipe.yaml"
    if text is not None:
        pipe.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(pipe), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert err.strip() == f"error: {tmp_path}/{expected}", err
    assert not (tmp_path / "out").exists()
