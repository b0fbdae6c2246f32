"""Lightning CheckpointIO plugin over :mod:`difftime.checkpoints` (atomic, verified, weights-only).

Lightning's own ``TorchCheckpointIO`` stages a file in ``$TMPDIR`` and moves it across
filesystems (not atomic) and loads without checking the zip CRCs, so this plugin replaces both
operations; everything else is Lightning's.
"""

from __future__ import annotations

from typing import Any, Callable

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from difftime.checkpoints import CorruptCheckpointError, atomic_torch_save, load_verified

__all__ = ["CorruptCheckpointError", "SafeCheckpointIO"]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: atomic writes, verified weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_verified(path, map_location=map_location if map_location is not None else "cpu")
