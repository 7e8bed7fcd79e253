"""The ``lightning-rlhf`` command: LightningCLI for every stage, plus ``pipeline``.

    lightning-rlhf fit --config configs/demo/sft.yaml [--model.optim.learning_rate 1e-4 ...]
    lightning-rlhf validate --config ...
    lightning-rlhf pipeline --config configs/demo/pipeline.yaml --output_dir outputs/demo
    lightning-rlhf plan-memory --model llama-2-7b --stage ppo --lora --gpus 8 --fsdp
"""

from __future__ import annotations

import os
import sys

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
            self.parser.save(self.config, os.path.join(out, "fit_config.yaml"), skip_none=False, overwrite=True,
                             multifile=self.multifile)


class RLHFCLI(LightningCLI):
    """LightningCLI with the stage modules as subclasses of ``LightningModule``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_callback", SaveConfigToOutput)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, RLHFDataModule, *args, **kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> RLHFCLI:
    from . import stages  # noqa: F401  (registers the stage classes for short class_path names)

    return RLHFCLI(args=args, run=run)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "pipeline":
        from .pipeline import main as pipeline_main

        pipeline_main(args[1:])
        return
    if args and args[0] == "plan-memory":
        from .memory import main as plan_memory_main

        plan_memory_main(args[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
