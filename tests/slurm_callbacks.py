"""Test-only callbacks for the real-SLURM tests (imported by train.py runs through PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SlowFirstAttempt(Callback):
    """Sleep ``seconds`` after every training step of a job's first attempt (``SLURM_RESTART_COUNT``
    unset or 0): a job too long for its time limit, or slow enough to be preempted after a few
    checkpoints, whose requeued attempt then runs at full speed. Sleeping costs no CPU and changes
    no number."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.seconds > 0 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(self.seconds)


class FailWhileExists(Callback):
    """Fail the fit at its start while the file ``path`` exists (a unit that fails until fixed)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if Path(self.path).exists():
            raise RuntimeError(f"FailWhileExists: {self.path} exists")
