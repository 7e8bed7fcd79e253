"""Pipeline fingerprints: a stage is skipped only when its folder holds what its config, data and input
stages say it should; a stage YAML run on its own into a pipeline folder cannot pass for the pipeline's
model; a rerun stage makes every stage downstream rerun. (No training here: the stage runs are replaced
by writing a model file, so these tests check the bookkeeping alone; tests/test_pipeline.py runs it.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from lightning_rlhf import pipeline
from lightning_rlhf.pipeline import StageSpec, stage_fingerprint, stale_reason, write_record


@pytest.fixture
def stages(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "SFTModule", "init_args": {"policy": {"path": "base"}, "output_dir": "outputs/sft"}},
        "data": {"train_files": str(data)},
        "trainer": {"max_steps": 3, "logger": {"class_path": "WandbLogger", "init_args": {"name": "x"}}},
    }))
    sft = StageSpec(name="sft", config=str(cfg))
    dpo = StageSpec(name="dpo", config=str(cfg), inputs={"model.init_args.policy.path": "sft"})
    return tmp_path, data, sft, dpo


def fake_run(out: Path) -> None:
    """What a stage run leaves: a model folder (a new file each time)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(os.urandom(16))


def run_all(tmp_path: Path, specs: list[StageSpec]) -> dict[str, str | None]:
    """The decision loop of run_pipeline with fake runs: {stage: reason it ran, or None if skipped}."""
    fps: dict[str, str] = {}
    ran: dict[str, str | None] = {}
    for st in specs:
        out = tmp_path / "out" / st.name
        expected = stage_fingerprint(st, fps)
        ran[st.name] = stale_reason(out, expected)
        if ran[st.name] is None:
            fps[st.name] = pipeline.read_record(out)["fingerprint"]
        else:
            fake_run(out)
            fps[st.name] = write_record(out, st, expected)
    return ran


def test_up_to_date_stages_are_skipped(stages):
    tmp, _, sft, dpo = stages
    assert run_all(tmp, [sft, dpo]) == {"sft": "no model yet", "dpo": "no model yet"}
    assert run_all(tmp, [sft, dpo]) == {"sft": None, "dpo": None}


def test_a_folder_written_outside_the_pipeline_is_rerun_and_so_is_everything_downstream(stages):
    tmp, _, sft, dpo = stages
    run_all(tmp, [sft, dpo])
    # `lightning-rlhf fit --config sft.yaml --model.init_args.output_dir out/sft`: new weights, old record
    time.sleep(0.01)
    (tmp / "out" / "sft" / "model.safetensors").write_bytes(os.urandom(16))
    ran = run_all(tmp, [sft, dpo])
    assert "changed after the pipeline wrote them" in ran["sft"]
    assert ran["dpo"] == "its input stage 'sft' changed: rerun"
    # a folder with no record at all (e.g. an older pipeline's or a stage YAML's) is not trusted either
    (tmp / "out" / "sft" / pipeline.RECORD).unlink()
    ran = run_all(tmp, [sft, dpo])
    assert "did not write" in ran["sft"] and ran["dpo"] is not None


def test_a_changed_config_or_data_file_reruns_the_stage_and_downstream(stages):
    tmp, data, sft, dpo = stages
    run_all(tmp, [sft, dpo])
    sft2 = StageSpec(name="sft", config=sft.config, args={"trainer.max_steps": 4})
    ran = run_all(tmp, [sft2, dpo])
    assert ran["sft"] == "its config changed: rerun" and ran["dpo"] == "its input stage 'sft' changed: rerun"
    data.write_text('{"text": "b"}\n')
    ran = run_all(tmp, [sft2, dpo])
    assert ran["sft"] == "a data file or model folder it names changed: rerun" and ran["dpo"] is not None
    # only the downstream stage's own change: the upstream one is kept
    dpo2 = StageSpec(name="dpo", config=dpo.config, inputs=dpo.inputs, args={"trainer.max_steps": 5})
    assert run_all(tmp, [sft2, dpo2]) == {"sft": None, "dpo": "its config changed: rerun"}


def test_loggers_output_dir_and_input_paths_do_not_change_the_fingerprint(stages):
    tmp, _, sft, dpo = stages
    base = stage_fingerprint(dpo, {"sft": "f1"})
    moved = StageSpec(name="dpo", config=dpo.config, inputs=dpo.inputs,
                      args={"trainer.logger": False, "model.init_args.output_dir": "elsewhere"})
    assert stage_fingerprint(moved, {"sft": "f1"}) == base
    assert stage_fingerprint(dpo, {"sft": "f2"}) != base


def test_demo_stage_yamls_do_not_write_into_the_pipeline_folder(repo_root):
    """Run on their own, the demo stage YAMLs write to outputs/<stage>, not the pipeline's outputs/demo/<stage>."""
    for path in sorted((repo_root / "configs" / "demo").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "stages" in raw:
            continue
        out = raw["model"]["init_args"]["output_dir"]
        assert out == f"outputs/{path.stem}", (path.name, out)
        assert "outputs/demo" not in path.read_text(), path.name
