"""The ``lightning-rlhf`` command: LightningCLI for every stage, plus ``pipeline`` and ``generate``.

    lightning-rlhf fit --config configs/demo/sft.yaml [--model.init_args.optim.learning_rate 1e-4 ...]
    lightning-rlhf validate --config ...
    lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo
    lightning-rlhf generate --model outputs/demo/sft --prompt "Write a review of a kettle."
    lightning-rlhf fabric --config configs/demo/sft.yaml
    lightning-rlhf plan-memory --model llama-2-7b --stage ppo --lora --gpus 8 --fsdp

A user's mistake (data, config, paths, reward functions) is one ``error: ...`` message on stderr and a
non-zero exit code; ``--debug`` (or ``LIGHTNING_RLHF_DEBUG=1``) shows the traceback too. Data and model
folders are checked before anything is created (logger run, output folder) or any model is loaded.

Lightning is imported lazily, so ``lightning-rlhf --help`` answers without loading torch.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import sys
from dataclasses import fields, is_dataclass

from .errors import UNION_NOISE, debug_requested, reported

TOP_HELP = """\
usage: lightning-rlhf [--debug] {fit,validate,test,predict,fabric,pipeline,generate,plan-memory} ...

RLHF and preference tuning as PyTorch Lightning modules.

commands:
  fit         train a stage: lightning-rlhf fit --config configs/demo/sft.yaml
  validate    one evaluation epoch over the validation set
  test        one evaluation epoch over the test set
  predict     run inference on your data
  fabric      train a stage under Lightning Fabric, from the same YAML:
              lightning-rlhf fabric --config configs/demo/sft.yaml
  pipeline    run stages in order and compare their models:
              lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo
  generate    sample a trained model: lightning-rlhf generate --model outputs/demo/sft --prompt "..."
  plan-memory per-GPU memory of a stage's models: lightning-rlhf plan-memory --model llama-2-7b --stage ppo

options:
  -h, --help  show this message and exit
  --debug     show the traceback of an error (also: LIGHTNING_RLHF_DEBUG=1)

`lightning-rlhf fit --help` lists the Trainer and data options; a stage's own options are shown by
`lightning-rlhf fit --model.help SFTModule` (RewardModule, DPOModule, PPOModule, GRPOModule).
"""

FIT_EPILOG = (
    "A stage's own options (policy, optim, loss, ...): lightning-rlhf fit --model.help SFTModule "
    "(or RewardModule, DPOModule, PPOModule, GRPOModule). The complete config of a YAML: "
    "lightning-rlhf fit --config configs/demo/sft.yaml --print_config."
)


_argv: list[str] = []  # the command line being parsed, for error messages


def _option_names(class_path: str) -> list[str]:
    """Option names a class accepts (dataclass fields or constructor parameters); [] if unknown."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return []
    if is_dataclass(cls):
        return [f.name for f in fields(cls)]
    if not isinstance(cls, type):
        return []
    names: list[str] = []
    for klass in cls.__mro__:  # a subclass's **kwargs reach its base's parameters (PPOModule -> OnlineRLModule)
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name != "self" and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


_GROUP_CLASSES = {"data": "lightning_rlhf.data.RLHFDataModule", "trainer": "lightning.pytorch.Trainer"}


def _unrecognized(message: str, argv: list[str]) -> str | None:
    """``unrecognized arguments: --x.y`` (a stage's, the data module's or the Trainer's option) -> the option
    as the user wrote it, with close matches from the class that rejected it."""
    found = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if not found:
        return None
    key = found.group(1).split("=", 1)[0]
    group = re.match(r"\s*(?:Parser key \"(\w+)\"|(\w+):)", message)
    group = (group.group(1) or group.group(2)) if group else None
    class_paths = re.findall(r"Problem with given class_path '([^']+)'", message)
    if group is None and "." in key:  # top level: --data.batch_sise
        group, key = key.split(".", 1)
    bad = key.split(".")[0]
    if class_paths:
        owner, names = class_paths[-1].rsplit(".", 1)[-1], _option_names(class_paths[-1])
    elif group in _GROUP_CLASSES:
        owner, names = _GROUP_CLASSES[group].rsplit(".", 1)[-1], _option_names(_GROUP_CLASSES[group])
    elif group == "model":  # no class named: any stage's options
        from . import stages

        owner, names = None, sorted({n for c in stages.__all__ for n in _option_names(f"lightning_rlhf.stages.{c}")})
    else:
        owner, names = None, []
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith(f"--{group}.") and
                 a.split("=", 1)[0].endswith(f".{key}")), f"--{group}.{key}" if group else f"--{key}")
    close = difflib.get_close_matches(bad, names, n=3, cutoff=0.6)
    line = f"option '{flag}' is not accepted" + (f" by {owner}" if owner else "")
    if close:
        line += f"; did you mean {' or '.join(close)}?"
    return line


def _config_problem(message: str, argv: list[str]) -> str | None:
    """A ``--config`` file that does not exist or is not valid YAML -> one line naming the file."""
    missing = re.search(r"Parser key \"(config|c)\": File does not exist: '([^']+)'", message)
    if missing:
        return f"--config: {missing.group(2)} does not exist"
    if not message.startswith("Problems parsing config"):
        return None
    detail = " ".join(ln.strip() for ln in message.split(":", 1)[1].splitlines() if ln.strip())
    where = re.search(r'in "<unicode string>", line (\d+), column (\d+)', detail)
    detail = re.sub(r'\s*in "<unicode string>", line \d+, column \d+', "", detail).strip()
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    name = configs[-1] if len(configs) == 1 else "a --config file"
    at = f" at line {where.group(1)}, column {where.group(2)}" if where else ""
    return f"{name}: not valid YAML{at}: {detail}"


def condense_parse_error(message: str, argv: list[str]) -> str:
    """jsonargparse's nested union report -> the one line that matters, with close matches for a typo."""
    unknown = re.findall(r"Option '([^']+)' is not accepted", message) or re.findall(
        r'Key "([^"]+)" is not expected', message
    )
    class_paths = re.findall(r"Problem with given class_path '([^']+)'", message)
    if unknown:
        bad = unknown[-1]
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and
                     a.split("=", 1)[0].rsplit(".", 1)[-1] == bad), None)
        owner = class_paths[-1].rsplit(".", 1)[-1] if class_paths else None
        names = _option_names(class_paths[-1]) if class_paths else []
        close = difflib.get_close_matches(bad, names, n=3, cutoff=0.6)
        line = f"option {flag or bad!r} is not accepted" + (f" by {owner}" if owner else "")
        if close:
            line += f"; did you mean {' or '.join(close)}?"
        elif names:
            line += f" (its options: {', '.join(names)})"
        return line
    line = _unrecognized(message, argv) or _config_problem(message, argv)
    if line:
        return line
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [ln.strip(" -") for ln in message.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Parser key") and not any(n in ln for n in UNION_NOISE)]
    detail = lines[-1] if lines else message.strip().splitlines()[0]
    where = ".".join(k for k in keys if k != "init_args")
    return f"{where}: {detail}" if where and where not in detail else detail


@functools.cache
def _parser_class():
    from lightning.pytorch.cli import LightningArgumentParser

    class RLHFArgumentParser(LightningArgumentParser):
        """Parse errors as one line (plus a hint) instead of the usage and jsonargparse's union report."""

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
                return super().error(message, ex)
            if os.environ.get("LIGHTNING_RLHF_DEBUG", "0") not in ("", "0"):
                sys.stderr.write(message + "\n")
            sys.stderr.write(
                f"error: {condense_parse_error(message, _argv)}\n"
                f"(`lightning-rlhf fit --help` lists the options; `lightning-rlhf fit --model.help SFTModule` a stage's)\n"
            )
            self.exit(2)

    return RLHFArgumentParser


@functools.cache
def _cli_class():
    from lightning import LightningModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from .data import RLHFDataModule

    class SaveConfigToOutput(SaveConfigCallback):
        """Save the run's complete config next to the stage's output (``<output_dir>/fit_config.yaml``),
        not into the working directory, which W&B's ``log_dir`` would give."""

        def __init__(self, *args, **kwargs):
            kwargs["save_to_log_dir"] = False
            super().__init__(*args, **kwargs)

        def save_config(self, trainer, pl_module, stage: str) -> None:
            out = getattr(pl_module, "output_dir", None)
            if out:
                os.makedirs(out, exist_ok=True)
                # keep None values; jsonargparse 4.49 renamed skip_none (now deprecated, with a warning) to skip_unset
                keep = {"skip_unset" if _jsonargparse_version() >= (4, 49) else "skip_none": False}
                self.parser.save(self.config, os.path.join(out, "fit_config.yaml"), overwrite=True,
                                 multifile=self.multifile, **keep)

    class RLHFCLI(LightningCLI):
        """LightningCLI with the stage modules as subclasses of ``LightningModule``; the data is read and
        validated before the Trainer starts (before the logger's run or any output folder exists)."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("save_config_callback", SaveConfigToOutput)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            kwargs.setdefault("auto_configure_optimizers", False)
            kwargs.setdefault("parser_class", _parser_class())
            super().__init__(LightningModule, RLHFDataModule, *args, **kwargs)

        def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            parser.epilog = FIT_EPILOG
            return parser

        def validate_inputs(self) -> None:
            """Read, validate and tokenise the data now, with the stage's data kind and tokenizer."""
            dm = self.datamodule
            if isinstance(dm, RLHFDataModule):
                dm.load(getattr(self.model, "data_kind", None) or None, getattr(self.model, "tokenizer", None))

        def before_fit(self) -> None:
            self.validate_inputs()
            _quiet_loggers(self.trainer)
            from .checkpointing import SaveOnSigterm

            if not any(isinstance(c, SaveOnSigterm) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(SaveOnSigterm())

        def before_validate(self) -> None:
            self.validate_inputs()

    RLHFCLI.SaveConfigToOutput = SaveConfigToOutput
    return RLHFCLI


def _jsonargparse_version() -> tuple[int, ...]:
    import jsonargparse

    return tuple(int(x) for x in re.findall(r"\d+", jsonargparse.__version__)[:2])


class _DropTips:
    """Drop Lightning's advertising tips ("💡 Tip: ... litlogger") from its info log; keep the rest."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("💡")


class _DropStartingWith:
    """Drop the log records whose message starts with ``prefix``; keep the rest."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def quiet() -> None:
    """Silence noise that says nothing about the run, on purpose and by exact message."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    # bitsandbytes (which peft imports in every LoRA run, quantised or not) tries to fetch an optional CPU kernel
    # from the Hub when it is imported and warns when the `kernels` package is missing; it then uses its own.
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropStartingWith) for f in bnb.filters):
        bnb.addFilter(_DropStartingWith("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # A stage run without validation data: Lightning warns that the empty val loader list has length 0.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # PPO/GRPO have no validation_step (they are evaluated by sampling: PolicyEvaluation); Lightning
    # warns whenever the data module defines val_dataloader at all, even when it returns no loader.
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    # LightningCLI dumps its config with jsonargparse's skip_none, which jsonargparse 4.49 renamed skip_unset:
    # a deprecation notice on every run, from Lightning's code (lightning/pytorch/cli.py).
    warnings.filterwarnings("ignore", message=r"(?s).*skip_none parameter was deprecated")


def _quiet_loggers(trainer) -> None:
    # Lightning's WandbLogger passes `anonymous=None` to wandb.init, and wandb then warns that the
    # setting "has no effect"; leave the key out when it is not set.
    for logger in getattr(trainer, "loggers", []):
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)


def __getattr__(name: str):
    # ``from lightning_rlhf.cli import RLHFCLI`` keeps working; the import of Lightning waits until then.
    if name == "RLHFCLI":
        return _cli_class()
    if name == "SaveConfigToOutput":
        return _cli_class().SaveConfigToOutput
    raise AttributeError(name)


def cli_main(args: list[str] | None = None, run: bool = True):
    from . import stages  # noqa: F401  (registers the stage classes for short class_path names)

    global _argv
    _argv = list(sys.argv[1:] if args is None else args)
    quiet()
    if args is None:
        return _cli_class()(args=None, run=run)
    import warnings

    with warnings.catch_warnings():
        # Called from Python with its own arguments (tests, notebooks, `main`): that is the intent.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return _cli_class()(args=args, run=run)


# ----------------------------------------------------------------------------------- help cache
# `fit --help` needs LightningCLI, and `import lightning.pytorch` alone takes ~5 s here (Lightning imports
# torchmetrics, which imports transformers, scipy and matplotlib). The help text of a plain help request
# is therefore kept on disk, keyed on everything that determines it, and printed from there.

HELP_CACHE_VERSION = 1
HELP_CACHE_KEEP = 32  # help texts kept; older ones are deleted
_VOLATILE_ENV = {"_", "PWD", "OLDPWD", "SHLVL"}  # shell bookkeeping; the working folder is in the key


def help_request(args: list[str]) -> bool:
    """True for a pure help request, ``<command> -h|--help`` or ``<command> --<key>.help <class>`` of one
    of this package's classes: its output depends on no file named on the command line (no ``--config``)
    and on no user module (whose source the key does not stamp), only on code and environment."""
    if len(args) == 2 and args[1] in ("-h", "--help"):
        return True
    ours = "." not in args[2] or args[2].startswith("lightning_rlhf.") if len(args) == 3 else False
    return ours and args[1].startswith("--") and args[1].endswith(".help") and not os.path.exists(args[2])


def _stamp_tree(root: str, out: list) -> None:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".pyi", ".json", ".yaml", ".jinja")):
                st = os.stat(os.path.join(folder, name))
                out.append((os.path.relpath(os.path.join(folder, name), root), st.st_size, st.st_mtime_ns))


def help_key(args: list[str], package_dirs: list[str] | None = None) -> str:
    """sha256 of what a help text depends on: the command line (and the program name), the Python and
    its import path, every installed distribution (name, version and install time of each
    ``*.dist-info``/``*.egg-info``, and ``.pth`` files, in every import-path folder), this package's
    source files (path, size, mtime), the environment (less shell bookkeeping), the working folder and
    the terminal's width. Any change gives a new key, so a stale text is never printed."""
    import hashlib
    import json
    import shutil

    parts: list = [HELP_CACHE_VERSION, sys.argv[0] and os.path.basename(sys.argv[0]), args, sys.version,
                   sys.executable, sys.path, os.getcwd(), tuple(shutil.get_terminal_size()),
                   sorted((k, v) for k, v in os.environ.items() if k not in _VOLATILE_ENV)]
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info", ".pth", ".egg-link")):
                st = os.stat(os.path.join(entry or ".", name))
                parts.append((entry, name, st.st_mtime_ns))
    files: list = []
    for root in package_dirs or [os.path.dirname(os.path.abspath(__file__))]:
        _stamp_tree(root, files)
    parts.append(files)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def help_cache_dir() -> str | None:
    """``$XDG_CACHE_HOME/lightning-rlhf/help`` (``~/.cache`` by default); None when
    ``LIGHTNING_RLHF_HELP_CACHE=0`` turns the cache off."""
    if os.environ.get("LIGHTNING_RLHF_HELP_CACHE", "1") in ("", "0"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning-rlhf", "help")


def _cached_help(args: list[str], run, from_command_line: bool) -> None:
    """Print the help of ``args`` from the cache, or run ``run()`` (which prints it and exits 0) and keep
    what it printed. Anything but a clean exit 0 is not kept. Only for a fresh command-line process:
    called from Python, the help could list classes that the caller imported (known subclasses)."""
    folder = help_cache_dir()
    if folder is None or not from_command_line or not help_request(args):
        return run()
    path = os.path.join(folder, help_key(args) + ".txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = None
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
        raise SystemExit(0)
    import contextlib
    import io

    buffer = io.StringIO()
    code: object = "raised"
    try:
        with contextlib.redirect_stdout(buffer):
            run()
        code = 0
    except SystemExit as e:
        code = e.code
        raise
    finally:
        text = buffer.getvalue()
        sys.stdout.write(text)
        sys.stdout.flush()
        if code in (0, None) and text:
            with contextlib.suppress(OSError):
                os.makedirs(folder, exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)  # atomic: a reader sees the whole text or none
                _prune(folder, keep=HELP_CACHE_KEEP)


def _prune(folder: str, keep: int) -> None:
    """Delete all but the ``keep`` newest help texts (each source edit or upgrade makes a new key)."""
    import contextlib

    entries = [e for e in os.scandir(folder) if e.name.endswith(".txt")]
    if len(entries) > keep:
        for e in sorted(entries, key=lambda e: e.stat().st_mtime_ns)[: len(entries) - keep]:
            with contextlib.suppress(OSError):
                os.remove(e.path)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in ("-h", "--help"):
        print(TOP_HELP, end="")
        return
    try:
        _dispatch(args, argv, debug)
        _end_process_group()
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":
            raise
        from . import checkpointing

        saved = checkpointing.last_saved
        sys.stderr.write(f"{saved if saved is not None else 'stopped by SIGTERM (no checkpoint saved)'}\n")
        raise SystemExit(143) from None  # 128 + SIGTERM, as a shell reports a job ended by it


def _end_process_group() -> None:
    """Destroy torch.distributed's process groups after a command that succeeded, as PyTorch asks of
    every program: left to the interpreter's exit, gloo's worker threads can abort the process
    ("terminate called without an active exception", exit -6) after training has finished
    (pytorch/pytorch#190489). Lightning leaves the groups up after ``fit``. After a failure the groups
    are left alone: destroying them could wait on a rank that is gone."""
    dist = sys.modules.get("torch.distributed")  # never imported for --help
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dispatch(args: list[str], argv: list[str] | None, debug: bool) -> None:
    with reported(debug):
        if args[0] == "pipeline":
            from .pipeline import main as pipeline_main

            pipeline_main(args[1:])
        elif args[0] == "generate":
            from .generate_cli import main as generate_main

            generate_main(args[1:])
        elif args[0] == "fabric":
            from .fabric import main as fabric_main

            _cached_help(args, lambda: fabric_main(args[1:]), argv is None)
        elif args[0] == "plan-memory":
            from .memory import main as plan_memory_main

            plan_memory_main(args[1:])
        elif argv is None:
            sys.argv = sys.argv[:1] + args  # without --debug; LightningCLI reads sys.argv itself
            _cached_help(args, lambda: cli_main(None), from_command_line=True)
        else:
            cli_main(args)


if __name__ == "__main__":
    main()
