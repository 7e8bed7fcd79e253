"""Every user mistake on the command line is one ``error:`` message on stderr, a non-zero exit code, no
traceback, and nothing created (no W&B run folder, no output folder); ``--debug`` shows the traceback.
Stage modules accept dicts for every spec from Python, and check their model folders first."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlhf.cli import condense_parse_error, main
from lightning_rlhf.data import DataFormatError
from lightning_rlhf.errors import ConfigError, check_model_path

REPO = Path(__file__).resolve().parents[1]
SFT_YAML = REPO / "configs" / "demo" / "sft.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def run_fit(capsys, tmp_path, *args: str) -> tuple[int, str]:
    """``lightning-rlhf fit`` in-process with outputs under tmp_path; returns (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([
            "fit", "--config", str(SFT_YAML), "--trainer.max_steps", "1", "--trainer.callbacks", "[]",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb_runs"),
            "--model.init_args.output_dir", str(tmp_path / "out"), *args,
        ])
    return exit_.value.code, capsys.readouterr().err


def assert_clean(code: int, err: str, tmp_path: Path, expected: str) -> None:
    assert code != 0
    assert "Traceback" not in err and "wandb" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], err
    # nothing was created: no logger run, no output folder
    assert not (tmp_path / "wandb_runs").exists() and not (tmp_path / "out").exists()


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"prompt": "Write a review.", "completion": " Great kettle."}).encode()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"prompt": "x", "completion": 3', "record 1 (line 2): invalid JSON: Expecting ',' delimiter"),
        (b'{"prompt": "a\xff", "completion": "b"}', "record 1 (line 2): not valid UTF-8: byte 0xff at column 14"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                  {"role": "assistant", "content": "ok"}]}).encode(),
         "record 1 (line 2): field 'messages' message 0 has unknown role 'wizard'"),
        (json.dumps({"prompt": "", "completion": "ok"}).encode(), "record 1 (line 2): field 'prompt' is empty"),
    ],
    ids=["bad_json", "not_utf8", "unknown_role", "empty_prompt"],
)
def test_bad_data_is_one_line_and_creates_nothing(capsys, tmp_path, line, expected):
    data = _jsonl(tmp_path / "bad.jsonl", [GOOD, line])
    code, err = run_fit(capsys, tmp_path, "--data.train_files", str(data), "--data.val_files", "null")
    assert_clean(code, err, tmp_path, f"error: {data}, {expected}")


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_RLHF_DEBUG", "0")  # restored after the test (--debug sets it to 1)
    data = _jsonl(tmp_path / "bad.jsonl", [GOOD, b"[1]"])
    with pytest.raises(DataFormatError, match="expected a JSON object"):
        main(["fit", "--debug", "--config", str(SFT_YAML), "--trainer.logger", "false",
              "--data.train_files", str(data), "--data.val_files", "null"])


def test_missing_model_folder_is_one_line_before_anything_loads(capsys, tmp_path):
    code, err = run_fit(capsys, tmp_path, "--model.init_args.policy.path", str(tmp_path / "no_such_model"))
    assert_clean(code, err, tmp_path, f"SFTModule policy.path: model folder {tmp_path / 'no_such_model'} does not exist")
    assert "Union" not in err and "Given value" not in err


def test_misspelled_option_says_did_you_mean(capsys, tmp_path):
    code, err = run_fit(capsys, tmp_path, "--model.init_args.optim.learning_rat", "1e-3")
    assert_clean(code, err, tmp_path, "option '--model.init_args.optim.learning_rat' is not accepted by OptimSpec; "
                                      "did you mean learning_rate?")
    assert len(err.strip().splitlines()) <= 3, err  # no usage dump


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.optimm.learning_rate", "1e-3"],
         "option '--model.init_args.optimm.learning_rate' is not accepted by SFTModule; did you mean optim?"),
        (["--model.init_args.learning_rat", "1e-3"],  # not a stage option: a close OptimSpec name is not offered
         "option '--model.init_args.learning_rat' is not accepted by SFTModule"),
        (["--data.batch_sise", "4"],
         "option '--data.batch_sise' is not accepted by RLHFDataModule; did you mean batch_size or eval_batch_size?"),
        (["--trainer.max_stpes", "1"], "option '--trainer.max_stpes' is not accepted by Trainer; did you mean max_steps"),
    ],
    ids=["stage_argument", "stage_argument_no_match", "data", "trainer"],
)
def test_every_misspelled_option_group_says_did_you_mean(capsys, tmp_path, args, expected):
    code, err = run_fit(capsys, tmp_path, *args)
    assert_clean(code, err, tmp_path, f"error: {expected}")
    assert len(err.strip().splitlines()) <= 3, err  # no usage dump


def test_a_bad_or_missing_config_file_is_named(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning_rlhf.stages.SFTModule\n  init_args: {policy: [\n")
    for config, expected in (
        (bad, f"error: {bad}: not valid YAML at line 4, column 1: while parsing a flow node did not find expected "
              "node content"),
        (tmp_path / "nope.yaml", f"error: --config: {tmp_path / 'nope.yaml'} does not exist"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(config)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert err.splitlines()[0] == expected, err


@pytest.mark.parametrize("option", ["reward_functions", "diagnostic_functions"])
def test_an_unknown_reward_function_is_one_line_before_anything_is_created(capsys, tmp_path, demo_dir, option):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "demo" / "grpo_sentiment.yaml"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb_runs"),
              "--model.init_args.output_dir", str(tmp_path / "out"),
              "--model.init_args.policy.path", str(demo_dir),
              f"--model.init_args.{option}", "[lightning_rlhf.demo.rewards.no_such_reward]"])
    assert_clean(exit_.value.code, capsys.readouterr().err, tmp_path,
                 "error: reward function 'lightning_rlhf.demo.rewards.no_such_reward': module "
                 "'lightning_rlhf.demo.rewards' has no callable 'no_such_reward'")


def test_wrong_type_names_the_option(capsys, tmp_path):
    code, err = run_fit(capsys, tmp_path, "--model.init_args.optim.learning_rate", "abc")
    assert_clean(code, err, tmp_path, "model.optim.learning_rate: Expected a <class 'float'>. Got value: abc")


def test_condense_keeps_the_inner_error():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightning_rlhf.stages.SFTModule':
        Option 'optimm' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""
    assert condense_parse_error(message, ["--model.init_args.optimm", "3"]) == (
        "option '--model.init_args.optimm' is not accepted by SFTModule; did you mean optim?"
    )


def test_top_level_help_lists_pipeline_and_generate_without_importing_lightning():
    out = subprocess.run([sys.executable, "-c", "import sys; from lightning_rlhf.cli import main; main(['--help']);"
                          "print('lightning' in sys.modules, 'torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "pipeline" in out.stdout and "generate" in out.stdout and "--model.help SFTModule" in out.stdout
    assert out.stdout.strip().endswith("False False")


def test_fit_help_says_how_to_see_a_stage_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "lightning-rlhf fit --model.help SFTModule" in out


# ------------------------------------------------------------------------------------- from Python


def test_every_stage_accepts_dicts_for_its_specs(demo_dir):
    from lightning_rlhf.models.loader import LoraSpec, ModelSpec
    from lightning_rlhf.rollout import GenerationSpec
    from lightning_rlhf.stages import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
    from lightning_rlhf.stages.common import OptimSpec

    path = str(demo_dir)
    policy = {"path": path, "lora": {"r": 4}}
    optim = {"learning_rate": 1e-5}
    modules = [
        SFTModule(policy=policy, optim=optim),
        RewardModule(model=policy, optim=optim),
        DPOModule(policy=policy, optim=optim),
        PPOModule(policy=policy, reward_model=path, optim=optim, critic_optim=optim,
                  generation={"max_new_tokens": 4}),
        GRPOModule(policy=policy, reward_model=path, optim=optim, generation={"max_new_tokens": 4}),
    ]
    for m in modules:
        assert isinstance(m.optim, OptimSpec) and m.optim.learning_rate == 1e-5, type(m).__name__
        spec = getattr(m, "policy_spec", None) or m.model_spec
        assert isinstance(spec, ModelSpec) and isinstance(spec.lora, LoraSpec) and spec.lora.r == 4
    assert isinstance(modules[3].critic_optim, OptimSpec)
    for m in modules[3:]:
        gen = m.generation_spec if hasattr(m, "generation_spec") else m.generation
        assert isinstance(gen, GenerationSpec) and gen.max_new_tokens == 4


def _holding(obj, cls, key, value):
    """The ``cls`` instance with ``key == value`` among ``obj``'s attributes (one level of specs down too)."""
    for v in vars(obj).values():
        for candidate in (v, *(vars(v).values() if dataclasses.is_dataclass(v) and not isinstance(v, type) else ())):
            if isinstance(candidate, cls) and getattr(candidate, key, None) == value:
                return candidate
    return None


@pytest.mark.parametrize("stage_name", ["SFTModule", "RewardModule", "DPOModule", "PPOModule", "GRPOModule"])
def test_every_spec_argument_of_every_stage_takes_a_dict(demo_dir, stage_name):
    """Every argument annotated with a spec dataclass (found from the signatures, so a new one is covered too),
    given as a dict with its nested specs as dicts, ends up as that dataclass in the built module."""
    import typing

    from lightning_rlhf import stages
    from lightning_rlhf.stages.common import _dataclasses_in, _init_hints

    stage = getattr(stages, stage_name)
    hints = _init_hints(stage)
    base = {"policy" if "policy" in hints else "model": str(demo_dir)}
    if "reward_functions" in hints:
        base["reward_functions"] = ["lightning_rlhf.demo.rewards.gold_reward"]
    checked = []
    for i, (name, annotation) in enumerate(hints.items()):
        if not _dataclasses_in(annotation):
            continue
        cls = _dataclasses_in(annotation)[0]
        names = {f.name for f in dataclasses.fields(cls)}
        key, marker = (("seed", 100 + i) if "path" in names else ("learning_rate", 0.5 + i) if "learning_rate" in names
                       else ("max_new_tokens", 10 + i))
        nested = [f.name for f in dataclasses.fields(cls) if _dataclasses_in(typing.get_type_hints(cls).get(f.name))]
        value = {key: marker, **({"path": str(demo_dir)} if "path" in names else {}),
                 **{n: {"r": 4} if n == "lora" else {} for n in nested}}
        spec = _holding(stage(**{**base, name: value}), cls, key, marker)
        assert spec is not None, f"{stage_name}({name}=dict): no {cls.__name__} built"
        for n in nested:
            assert dataclasses.is_dataclass(getattr(spec, n)), f"{stage_name} {name}.{n} stayed a dict"
        checked.append(name)
    assert {"optim", "policy" if "policy" in hints else "model"} <= set(checked), checked


def test_a_misspelled_spec_key_from_python_names_it(demo_dir):
    from lightning_rlhf.stages import GRPOModule, RewardModule, SFTModule

    with pytest.raises(ConfigError, match=r"SFTModule optim: unknown option 'learning_rat' for OptimSpec; "
                                          r"did you mean learning_rate\?"):
        SFTModule(policy=str(demo_dir), optim={"learning_rat": 1e-5})
    with pytest.raises(ConfigError, match=r"SFTModule policy.lora: unknown option 'rank' for LoraSpec"):
        SFTModule(policy={"path": str(demo_dir), "lora": {"rank": 4}})
    # a spec dict without its path: named, before the tokenizer or model is looked for
    for stage, arg in ((SFTModule, "policy"), (RewardModule, "model"), (GRPOModule, "policy")):
        with pytest.raises(ConfigError, match=rf"^{stage.__name__} {arg}.path is empty: name a model folder"):
            stage(**{arg: {"lora": {"r": 4}}})


def test_model_paths_are_checked(tmp_path, demo_dir, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_path(tmp_path / "nope", "policy.path")
    with pytest.raises(ConfigError, match="is a folder but holds no model"):
        check_model_path(tmp_path, "policy.path")
    check_model_path(demo_dir, "policy.path")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no Hugging Face Hub model of that id is in the local cache"):
        check_model_path("nobody-xyz/no-such-model", "policy.path")


def test_condense_unrecognized_stage_and_data_options():
    """jsonargparse's own wordings (as of 4.4x) of an unknown stage argument and an unknown data option."""
    stage = ("Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
             "    - Problem with given class_path 'lightning_rlhf.stages.PPOModule':\n"
             "        unrecognized arguments: --optimm.learning_rate=1e-3\n")
    assert condense_parse_error(stage, ["--model.optimm.learning_rate", "1e-3"]) == (
        "option '--model.optimm.learning_rate' is not accepted by PPOModule; did you mean optim?")  # a base's option
    assert condense_parse_error("model: unrecognized arguments: --optimm.learning_rate=1e-3", []) == (
        "option '--model.optimm.learning_rate' is not accepted; did you mean optim?")
    assert condense_parse_error("unrecognized arguments: --data.batch_sise 3", ["--data.batch_sise", "3"]) == (
        "option '--data.batch_sise' is not accepted by RLHFDataModule; did you mean batch_size or eval_batch_size?")
