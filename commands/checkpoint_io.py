"""Lightning CheckpointIO plugin over :mod:`difftime.checkpoints` (atomic, verified, weights-only).

Lightning's own ``TorchCheckpointIO`` stages a file in ``$TMPDIR`` and moves it across
filesystems (not atomic) and loads without checking the zip CRCs, so this plugin replaces both
operations; everything else is Lightning's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from difftime.checkpoints import CorruptCheckpointError, atomic_torch_save, load_verified

__all__ = ["CorruptCheckpointError", "KeepLastCheckpointName", "SafeCheckpointIO"]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: atomic writes, verified weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_verified(path, map_location=map_location if map_location is not None else "cpu")


class KeepLastCheckpointName(Callback):
    """Keep writing ``last.ckpt`` after a resume from another file of the same folder.

    ModelCheckpoint restores ``last_model_path`` from the checkpoint it resumes; a checkpoint
    written before the last ``last.ckpt`` (``step=N.ckpt``, ``preempt.ckpt``) holds an older or
    empty value, so Lightning treats the existing ``last.ckpt`` as someone else's and writes
    ``last-v1.ckpt`` beside it, while ``sample.py`` and ``--ckpt_path .../last.ckpt`` keep
    reading the stale file.
    """

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                if last.is_file():
                    callback.last_model_path = str(last)
