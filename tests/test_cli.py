"""The ``lightning-rlhf`` command: every shipped YAML parses, overrides land, print_config round-trips,
and a tiny ``fit`` runs end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lightning_rlhf.cli import cli_main, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/**/*.yaml"))
SFT_YAML = REPO / "configs" / "demo" / "sft.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    """The shipped configs name files relative to the repository root, as the README runs them."""
    monkeypatch.chdir(REPO)


def print_config(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", *args, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    return out


def is_pipeline(path: Path) -> bool:
    return "stages" in (yaml.safe_load(path.read_text()) or {})


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "sft.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_config_parses(config, capsys):
    if is_pipeline(config):
        # A pipeline config names stage configs: they must exist (and are parsed by this same test).
        from lightning_rlhf.pipeline import load_spec

        spec = load_spec(config)
        for stage in spec.stages:
            assert (REPO / stage.config).resolve() in {p.resolve() for p in CONFIGS}, stage.config
        return
    printed = yaml.safe_load(print_config(capsys, "--config", str(config)))
    raw = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"].rsplit(".", 1)[-1] == raw["model"]["class_path"].rsplit(".", 1)[-1]
    # every file a config names exists in the repository
    for key in ("train_files", "val_files"):
        files = (raw.get("data") or {}).get(key) or []
        for f in [files] if isinstance(files, str) else files:
            assert (REPO / f).exists(), f"{config.name}: data.{key} {f} does not exist"


@pytest.mark.parametrize("config", [p for p in CONFIGS if not is_pipeline(p)], ids=lambda p: p.name)
def test_print_config_round_trips(config, capsys, tmp_path):
    first = print_config(capsys, "--config", str(config))
    (tmp_path / "printed.yaml").write_text(first)
    second = print_config(capsys, "--config", str(tmp_path / "printed.yaml"))
    assert yaml.safe_load(second) == yaml.safe_load(first)


@pytest.mark.parametrize("flag", ["--model.optim.learning_rate", "--model.init_args.optim.learning_rate"])
def test_command_line_override_lands_in_the_module(flag):
    cli = cli_main(["--config", str(SFT_YAML), flag, "1e-4", "--trainer.logger", "false"], run=False)
    assert cli.model.optim.learning_rate == 1e-4
    # the rest of the YAML is kept
    assert cli.model.optim.warmup_steps == 30 and cli.model.optim.weight_decay == 0.01
    assert cli.datamodule.batch_size == yaml.safe_load(SFT_YAML.read_text())["data"]["batch_size"]


def test_yaml_values_land_in_the_module_and_trainer():
    cli = cli_main(["--config", str(SFT_YAML), "--trainer.logger", "false"], run=False)
    from lightning_rlhf.stages import SFTModule

    assert type(cli.model) is SFTModule
    assert cli.model.optim.learning_rate == 3e-3
    assert cli.model.policy_spec.path == "lightning_rlhf/demo/assets/tiny-llama"
    assert cli.model.policy is None  # built in configure_model, not at parse time
    assert cli.trainer.max_epochs == 3


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(SFT_YAML), "--model.optim.learning_rat", "1e-4", "--print_config"])
    assert exit_.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_end_to_end_writes_the_output_folder(
    tmp_path, tiny_model_dir, memo_sft_file, prompt_file, demo_tokenizer, capsys
):
    """``lightning-rlhf fit`` with the demo YAML, pointed at a tiny model and data, for 3 steps."""
    out = tmp_path / "sft"
    override = {
        "trainer": {
            "max_steps": 3,
            "logger": False,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning_rlhf.evaluation.PolicyEvaluation",
                    "init_args": {
                        "prompt_files": str(prompt_file),
                        "gold": ["lightning_rlhf.demo.rewards.gold_reward"],
                        "loss_files": str(memo_sft_file),
                        "sampling": {"num_samples": 2, "max_new_tokens": 6},
                        "max_prompts": 2,
                    },
                }
            ],
        },
        "model": {"init_args": {"policy": {"path": str(tiny_model_dir)}, "output_dir": str(out)}},
        "data": {"train_files": [str(memo_sft_file)], "val_files": [str(memo_sft_file)], "batch_size": 4},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(SFT_YAML), "--config", str(tmp_path / "override.yaml")])
    # no deprecation notice from our own calls (the config was saved with skip_none, renamed skip_unset)
    assert not [w for w in caught if "skip_none" in str(w.message)], [(w.filename, w.lineno) for w in caught]

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == len(demo_tokenizer)
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    # the trained weights differ from the start
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert any((a != b).any() for a, b in zip(model.parameters(), base.parameters(), strict=True))
    # the evaluation callback ran before and after fit and wrote its JSON next to the model
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"before", "after"}
    assert results["after"]["n_prompts"] == 2 and results["after"]["n_samples"] == 4
    assert results["after"]["completion_loss"] < results["before"]["completion_loss"]
    # the complete config is saved next to the model, and runs again as a config of its own
    saved = yaml.safe_load((out / "fit_config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 3 and saved["model"]["init_args"]["output_dir"] == str(out)
    assert yaml.safe_load(print_config(capsys, "--config", str(out / "fit_config.yaml"))) == saved


def test_generate_command_samples_through_the_chat_template(tiny_model_dir, capsys):
    """`lightning-rlhf generate` greedy output equals transformers' greedy generate on the chat-templated prompt."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompt = "Write a review of the kettle."
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)

    capsys.readouterr()
    main(["generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "6"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"### prompt: {prompt}" and out[1] == "---" and out[2] == expected

    # sampling: reproducible with a seed, num_samples responses per prompt
    from lightning_rlhf.generate_cli import generate_text

    a = generate_text(str(tiny_model_dir), ["a", "b"], num_samples=3, max_new_tokens=5, seed=7)
    assert len(a) == 2 and all(len(r) == 3 for r in a)
    assert a == generate_text(str(tiny_model_dir), ["a", "b"], num_samples=3, max_new_tokens=5, seed=7)


def test_generate_command_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --model: model folder {tmp_path / 'nope'} does not exist")


def test_quiet_drops_lightnings_val_loop_notice_and_nothing_else():
    """PPO/GRPO have no validation_step and Lightning warns whenever the data module defines
    val_dataloader (a notice in every online run); LightningCLI calls jsonargparse with a deprecated
    parameter (a notice in every run); `quiet` drops those messages only."""
    import warnings

    from lightning_rlhf import cli

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.quiet()
        warnings.warn("You passed in a `val_dataloader` but have no `validation_step`. Skipping val loop.", UserWarning, stacklevel=1)
        warnings.warn("\n    By default only one JsonargparseDeprecationWarning per type is shown. To see all warnings set "
                      "environment variable JSONARGPARSE_DEPRECATION_WARNINGS=all and to disable the warnings set "
                      "JSONARGPARSE_DEPRECATION_WARNINGS=off.\n\n    skip_none parameter was deprecated in v4.49.0 and "
                      "will be removed in v5.0.0. Instead use skip_unset.\n", UserWarning, stacklevel=1)
        warnings.warn("another_parameter was deprecated in v9", UserWarning, stacklevel=1)
        warnings.warn("a warning the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another_parameter was deprecated in v9", "a warning the user should see"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_normal_run_prints_no_scary_noise(tmp_path, memo_sft_file, lora):
    """A plain ``lightning-rlhf fit`` of the demo SFT YAML (W&B logger, offline) in a fresh process, as a user
    runs it: none of the notices the issue listed (bitsandbytes' gemm_4bit kernel load although nothing is
    quantised, W&B's "anonymous" setting, Lightning's logger tips, jsonargparse's skip_none deprecation).
    With LoRA, peft is imported, and peft imports bitsandbytes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "LIGHTNING_RLHF_HELP_CACHE": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_rlhf.cli", "fit", "--config", str(SFT_YAML), "--trainer.max_steps", "2",
         "--trainer.callbacks", "[]", "--trainer.val_check_interval", "1.0",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--model.init_args.output_dir", str(tmp_path / "out"),
         "--data.train_files", str(memo_sft_file), "--data.val_files", str(memo_sft_file),
         *(["--model.init_args.policy.lora", "{r: 4}"] if lora else [])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "runs" / "wandb").exists()
    for noise in ("gemm_4bit", "kernels-community", "anonymous", "💡", "litlogger", "skip_none", "Traceback"):
        assert noise not in text, f"{noise!r} in:\n{text}"
