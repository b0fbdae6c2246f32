"""Test-only callbacks that interrupt a run at a chosen point (importable by train.py runs)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAtStep(Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, like a node failure)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Send ``signum`` to this process at a training step or during a validation batch."""

    def __init__(self, step: int | None = None, val_batch: int | None = None, signum: str = "SIGUSR1") -> None:
        self.step, self.val_batch, self.signum = step, val_batch, getattr(signal, signum)
        self.sent = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.step is not None and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.val_batch is not None and batch_idx == self.val_batch and not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def make_nan_mlp(nan_calls: set[int]):
    """An MLP whose training forward returns NaN on the chosen calls (1-based)."""
    from difftime.networks import MLP

    class NaNMLP(MLP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls, self.nan_calls = 0, set(nan_calls)

        def forward(self, x, t):
            out = super().forward(x, t)
            if self.training:
                self.calls += 1
                if self.calls in self.nan_calls:
                    out = out * float("nan")
            return out

    return NaNMLP


def _mlp_base():
    from difftime.networks import MLP

    return MLP


class NaNFromMLP(_mlp_base()):
    """An MLP whose training forward is NaN from call ``nan_from`` on (a config-level fault)."""

    def __init__(self, dim: int = 2, hidden: int = 16, depth: int = 1, nan_from: int = 1) -> None:
        super().__init__(dim=dim, hidden=hidden, depth=depth)
        self.calls, self.nan_from = 0, nan_from

    def forward(self, x, t):
        out = super().forward(x, t)
        if self.training:
            self.calls += 1
            if self.calls >= self.nan_from:
                out = out * float("nan")
        return out


class CheckedCallback(Callback):
    """A callback whose ``check_config`` refuses ``limit`` above the model's T (like KLGap's T_grid)."""

    def __init__(self, limit: float = 0.5) -> None:
        self.limit = limit
        self.fitted = False

    def check_config(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from difftime.utils import ConfigError

        if self.limit > pl_module.sde.T:
            raise ConfigError("limit", self.limit, f"<= T = {pl_module.sde.T:g}", type(self).__name__)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fitted = True
