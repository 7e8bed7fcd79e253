"""``lightning-rlhf pipeline``: run the stages in order, evaluate every model the same way, report.

    lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo [--force]

Each stage is ``lightning-rlhf fit --config <its own YAML>`` in a child process, plus a small override
file that the pipeline writes: the stage's ``output_dir`` (``<output_dir>/<name>``), the folders of the
earlier stages it reads (``inputs``), the loggers (W&B offline, grouped per pipeline run, plus a CSV log
for the report's curves) and any ``args`` the pipeline YAML gives.

Each stage folder gets a ``pipeline_stage.json`` after its run: the stage's fingerprint, made of its
resolved config (its YAML merged with the pipeline's overrides; loggers and its own output path left
out), the contents of the files and folders that config names (data, base models), the fingerprints of
the stages it reads, and a stamp of the files it wrote. A stage is skipped only when its folder holds
a model with a matching record; otherwise (no record: e.g. a stage YAML run on its own wrote there;
a changed config or data; an input stage that was rerun; files rewritten since) it reruns, and so does
everything downstream. ``--force`` reruns every stage. When all stages have run, every model is evaluated by
:mod:`lightning_rlhf.evaluation` on the same held-out prompts with the same sampling settings and seed,
and ``report.json``, ``report.md`` and ``report.png`` are written.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # imported when used: `lightning-rlhf pipeline --help` needs no torch nor Lightning
    from .evaluation import SamplingSpec


@dataclass
class StageSpec:
    """One stage of a pipeline."""

    name: str
    """Stage name: its output folder is ``<output_dir>/<name>``."""
    config: str
    """The stage's own ``lightning-rlhf fit`` YAML."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Dotted config keys set to an earlier stage's output folder, e.g. ``{model.init_args.policy.path: sft}``."""
    args: dict[str, Any] = field(default_factory=dict)
    """Other dotted config keys to override for this pipeline."""


@dataclass
class EvalSpec:
    """How the models are compared (the same prompts, sampling and seed for each)."""

    prompt_files: str | list[str] = ""
    """Held-out prompts."""
    gold: list[str] = field(default_factory=list)
    """Gold reward functions (import paths); the first is the report's ``gold_reward``."""
    gold_range: tuple[float, float] = (-1.0, 1.0)
    """Lowest and highest possible gold reward."""
    models: dict[str, str] = field(default_factory=dict)
    """Report name -> stage name (its output folder) or a model folder path."""
    reference: str = "sft"
    """Model (name in ``models``) that ``kl_to_sft`` is measured against."""
    reward_model: str | None = "reward"
    """Stage whose reward model gives ``proxy_reward`` and is checked on ``reward_pairs``."""
    reward_pairs: str | None = None
    """Held-out preference pairs for the reward model's accuracy and Spearman's rho to gold."""
    sampling: SamplingSpec = field(default_factory=lambda: _sampling_spec())
    max_prompts: int | None = None


def _sampling_spec(**kwargs) -> SamplingSpec:
    from .evaluation import SamplingSpec

    return SamplingSpec(**kwargs)


@dataclass
class PipelineSpec:
    stages: list[StageSpec]
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    extra_evaluations: dict[str, EvalSpec] = field(default_factory=dict)
    """More comparisons (e.g. a verifiable task), reported under ``extra`` in report.json."""
    wandb_project: str = "lightning-rlhf"


class StageFailed(RuntimeError):
    pass


def _nest(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_dir(output_dir: Path, name: str) -> Path:
    return output_dir / name


def stage_done(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def override_config(stage: StageSpec, output_dir: Path, group: str, project: str) -> dict:
    """The override YAML of one stage (merged over the stage's own YAML by jsonargparse)."""
    loggers = [
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": project, "name": stage.name, "group": group, "save_dir": str(output_dir),
                       "offline": os.environ.get("WANDB_MODE", "offline") != "online"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(output_dir / "logs"), "name": stage.name, "version": ""}},
    ]
    dotted = {"model.init_args.output_dir": str(stage_dir(output_dir, stage.name)), "trainer.logger": loggers}
    dotted.update({k: str(stage_dir(output_dir, v)) for k, v in stage.inputs.items()})
    dotted.update(stage.args)
    return _nest(dotted)


RECORD = "pipeline_stage.json"
_IGNORED_KEYS = ("trainer.logger", "model.init_args.output_dir")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path, _cache: dict = {}) -> str:  # noqa: B006 (a per-process cache on purpose)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def folder_stamp(path: Path, skip: tuple[str, ...] = (RECORD,)) -> str:
    """Cheap identity of a folder's files (names, sizes, modification times): changes when they are rewritten."""
    items = sorted(
        (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in path.rglob("*") if f.is_file() and f.name not in skip
    )
    return _sha(items)


def _referenced_contents(config, found: dict[str, str]) -> dict[str, str]:
    """Content digests of the files (sha256) and folders (stamp) named anywhere in a config."""
    if isinstance(config, dict):
        for v in config.values():
            _referenced_contents(v, found)
    elif isinstance(config, list):
        for v in config:
            _referenced_contents(v, found)
    elif isinstance(config, str) and config and len(config) < 4096 and config not in found:
        p = Path(config)
        try:
            if p.is_file():
                found[config] = _file_digest(p)
            elif p.is_dir():
                found[config] = folder_stamp(p)
        except OSError:
            pass
    return found


def resolved_config(stage: StageSpec) -> dict:
    """The stage's YAML merged with the pipeline's ``args`` (as the child process sees them), without the
    keys that do not change the result (loggers, its own output folder) and without the input paths
    (their fingerprints stand for them)."""
    base = yaml.safe_load(Path(stage.config).read_text()) or {}
    dotted = {k: v for k, v in stage.args.items() if k not in _IGNORED_KEYS}
    merged = _merge(base, _nest(dotted))
    for key in (*_IGNORED_KEYS, *stage.inputs):
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return merged


def stage_fingerprint(stage: StageSpec, input_fingerprints: dict[str, str]) -> dict:
    """What a stage's result depends on: its resolved config, the contents it names, its inputs."""
    config = resolved_config(stage)
    return {
        "config": _sha(config),
        "contents": _sha(_referenced_contents(config, {})),
        "inputs": {stage_name: input_fingerprints.get(stage_name) for stage_name in sorted(set(stage.inputs.values()))},
    }


def read_record(path: Path) -> dict | None:
    record = _load_json(path / RECORD)
    return record or None


def stale_reason(out: Path, expected: dict) -> str | None:
    """None when ``out`` holds the result ``expected`` describes; else why it does not."""
    if not stage_done(out):
        return "no model yet"
    record = read_record(out)
    if record is None:
        return (f"{out} holds a model that this pipeline did not write (no {RECORD}; e.g. a stage YAML run "
                "on its own): rerun")
    if record.get("stamp") != folder_stamp(out):
        return f"the files in {out} changed after the pipeline wrote them: rerun"
    for key, what in (("config", "its config changed"), ("contents", "a data file or model folder it names changed")):
        if record.get(key) != expected[key]:
            return f"{what}: rerun"
    for name, fp in expected["inputs"].items():
        if record.get("inputs", {}).get(name) != fp:
            return f"its input stage '{name}' changed: rerun"
    return None


def write_record(out: Path, stage: StageSpec, expected: dict) -> str:
    """Write the stage's record after a successful run; return its fingerprint."""
    stamp = folder_stamp(out)
    record = {"stage": stage.name, "config_file": stage.config, **expected, "stamp": stamp}
    record["fingerprint"] = _sha(record)
    tmp = out / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / RECORD)
    return record["fingerprint"]


def run_stage(stage: StageSpec, output_dir: Path, group: str, project: str) -> dict:
    """Run one stage in a child process; return its wall time, peak memory and output folder."""
    out = stage_dir(output_dir, stage.name)
    override = output_dir / "configs" / f"{stage.name}.override.yaml"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(yaml.safe_dump(override_config(stage, output_dir, group, project), sort_keys=False))
    cmd = [sys.executable, "-m", "lightning_rlhf", "fit", "--config", stage.config, "--config", str(override)]
    print(f"\n=== stage {stage.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not stage_done(out):
        raise StageFailed(
            f"stage '{stage.name}' failed (exit code {proc.returncode}) running config {stage.config} "
            f"with overrides {override}; its output folder {out} has no model. See the log above."
        )
    peak_mb = rusage.ru_maxrss / 1024  # Linux reports KiB
    return {"wall_s": round(wall, 1), "peak_mem_mb": round(peak_mb, 1), "output": str(out)}


def _model_path(name_or_path: str, output_dir: Path) -> Path:
    """A stage's output folder, a model folder, or the cached snapshot of a Hub id (``org/name``)."""
    from .hub import HubNameError, is_hub_name, snapshot

    p = stage_dir(output_dir, name_or_path)
    if p.exists():
        return p
    if "/" in name_or_path and is_hub_name(name_or_path):
        try:
            return Path(snapshot(name_or_path))
        except HubNameError as e:
            print(f"[evaluate] {e}")
    return Path(name_or_path)


def evaluate_models(spec: EvalSpec, output_dir: Path) -> dict:
    """Evaluate every model of ``spec.models`` with the same prompts, sampling and seed."""
    import torch

    from .evaluation import evaluate_policy
    from .models import load_causal_lm, load_sequence_classifier, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"  # evaluate_policy moves the others
    ref_path = _model_path(spec.models.get(spec.reference, spec.reference), output_dir)
    reference = load_causal_lm(str(ref_path), trainable=False)
    reward_model = None
    if spec.reward_model and stage_done(stage_dir(output_dir, spec.reward_model)):
        reward_model = load_sequence_classifier(str(stage_dir(output_dir, spec.reward_model)), trainable=False)
    tokenizer = load_tokenizer(str(ref_path))
    results: dict[str, dict] = {}
    for name, src in spec.models.items():
        path = _model_path(src, output_dir)
        if not (path / "config.json").exists():
            print(f"[evaluate] skipping {name}: no model at {path}")
            continue
        print(f"[evaluate] {name} ({path})", flush=True)
        policy = load_causal_lm(str(path), trainable=False).to(device)
        res = evaluate_policy(
            policy, tokenizer, spec.prompt_files, gold=spec.gold, reward_model=reward_model, reference=reference,
            sampling=spec.sampling, max_prompts=spec.max_prompts,
        )
        res["kl_to_sft"] = res.pop("kl_to_ref")
        res["path"] = str(path)
        record = read_record(path)
        res["fingerprint"] = record["fingerprint"] if record else f"folder:{folder_stamp(path)}"
        results[name] = res
    out: dict[str, Any] = {"models": results, "gold_reward_range": list(spec.gold_range)}
    if reward_model is not None and spec.reward_pairs:
        out["reward_model"] = reward_model_report(reward_model, tokenizer, spec.reward_pairs, spec.gold[0])
    return out


def reward_model_report(reward_model, tokenizer, pair_files, gold: str) -> dict:
    """Held-out pairwise accuracy and Spearman's rho to the gold reward of a reward model."""
    from .data import load_records
    from .rollout import import_function
    from .stages.reward import evaluate_pairs

    fn = import_function(gold)
    res = evaluate_pairs(reward_model, tokenizer, load_records(pair_files),
                         gold_reward=lambda p, c: fn(prompts=[p], completions=[c])[0])
    return {"accuracy": res["accuracy"], "spearman_gold": res["spearman"], "n_pairs": int(res["pairs"])}


def gap_closed(models: dict, name: str, lo_hi: tuple[float, float], base: str = "sft") -> float | None:
    if name not in models or base not in models:
        return None
    best = lo_hi[1]
    s = models[base]["gold_reward"]["mean"]
    return (models[name]["gold_reward"]["mean"] - s) / (best - s) if best > s else None


def run_pipeline(spec: PipelineSpec, output_dir: str | Path, force: bool = False) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    group = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    stages: dict[str, dict] = {}
    fingerprints: dict[str, str] = {}
    prev = _load_json(output_dir / "report.json").get("stages", {})
    for stage in spec.stages:
        out = stage_dir(output_dir, stage.name)
        expected = stage_fingerprint(stage, fingerprints)
        reason = "--force" if force else stale_reason(out, expected)
        if reason is None:
            fingerprints[stage.name] = read_record(out)["fingerprint"]
            print(f"=== stage {stage.name}: {out} is up to date (fingerprint {fingerprints[stage.name][:12]}), "
                  "skipped (--force to rerun)")
            stages[stage.name] = prev.get(stage.name, {"output": str(out)}) | {
                "skipped": True, "fingerprint": fingerprints[stage.name]}
            continue
        if stage_done(out):
            print(f"=== stage {stage.name}: {reason}")
        (out / RECORD).unlink(missing_ok=True)  # a failed run leaves no record behind
        stages[stage.name] = run_stage(stage, output_dir, group, spec.wandb_project)
        fingerprints[stage.name] = write_record(out, stage, expected)
        stages[stage.name]["fingerprint"] = fingerprints[stage.name]
    print("\n=== evaluation", flush=True)
    report = evaluate_models(spec.evaluation, output_dir)
    report["stages"] = stages
    lo_hi = tuple(spec.evaluation.gold_range)
    report["gap_closed"] = {
        name: gap_closed(report["models"], name, lo_hi) for name in report["models"] if name not in ("base", "sft")
    }
    report["extra"] = {name: evaluate_models(e, output_dir) for name, e in spec.extra_evaluations.items()}
    report["evaluation"] = asdict(spec.evaluation)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    from .report import write_report

    write_report(report, output_dir)
    print(f"\nwrote {output_dir / 'report.json'}, report.md, report.png")
    print((output_dir / "report.md").read_text().split("\n## ")[0])
    return report


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a pipeline YAML into a :class:`PipelineSpec`, with errors that name the file and key."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with `stages` (and `evaluation`), got {type(raw).__name__}")

    def evaluation(d: dict, where: str) -> EvalSpec:
        d = dict(d)
        d["sampling"] = _sampling_spec(**d.get("sampling", {}))
        try:
            return EvalSpec(**d)
        except TypeError as e:
            raise ValueError(f"{path}: {where}: {e}") from None

    try:
        stages = [StageSpec(**s) for s in raw.pop("stages")]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: `stages` must be a list of {{name, config, inputs, args}}: {e}") from None
    known = {f.name for f in fields(PipelineSpec)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
            raise ValueError(f"{path}: unknown key '{key}'" + (f"; did you mean {' or '.join(close)}?" if close else
                                                               f" (keys: {', '.join(sorted(known))})"))
    spec = PipelineSpec(
        stages=stages,
        evaluation=evaluation(raw.pop("evaluation", {}), "evaluation"),
        extra_evaluations={k: evaluation(v, f"extra_evaluations.{k}") for k, v in raw.pop("extra_evaluations", {}).items()},
        **raw,
    )
    for st in spec.stages:
        if not Path(st.config).exists():
            raise ValueError(f"{path}: stage '{st.name}': config {st.config} does not exist")
    return spec


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (stages, evaluation)")
    parser.add_argument("--output_dir", default="outputs/demo", help="folder of all stage outputs and the report")
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    args = parser.parse_args(argv)
    try:
        run_pipeline(load_spec(args.config), args.output_dir, force=args.force)
    except (StageFailed, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
