"""Pre-emption: a checkpoint is saved when the job receives SIGTERM.

Lightning turns SIGTERM into a ``SIGTERMException`` raised after the current batch, on every rank alike
(rank 0 broadcasts it; it is a ``SystemExit`` whose exit code would be 0). :class:`SaveOnSigterm` saves
a checkpoint at that point (Lightning writes it atomically: a temporary file, then a rename); the
command line then says where it is and how to resume, and exits with 143 (128 + SIGTERM).
``lightning-rlhf fit`` adds it to every run. (Unlike Lightning's ``OnExceptionCheckpoint``, it saves on
SIGTERM only, not on a user's mistake.)
"""

from __future__ import annotations

from pathlib import Path

from lightning import Callback

from .errors import Preempted

last_saved: Preempted | None = None
"""The latest checkpoint saved on SIGTERM in this process (the CLI reports it)."""


class SaveOnSigterm(Callback):
    """Save ``<dirpath>/sigterm.ckpt`` when training stops on SIGTERM.

    Args:
        dirpath: folder of the checkpoint. None: the ``ModelCheckpoint``'s folder if there is one, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.saved: str | None = None

    def _dir(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return
        path = self._dir(trainer) / "sigterm.ckpt"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(path))  # every rank takes part (sharded strategies gather)
        self.saved = str(path)
        global last_saved
        last_saved = Preempted(str(path), trainer.global_step)
