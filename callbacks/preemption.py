"""Preemption on SLURM (or any scheduler that sends SIGUSR1/SIGTERM before killing a job).

The signal handler only sets a flag. At the next step boundary, in training or in
validation, all ranks agree on the flag (one all-reduce), save a checkpoint together, rank zero
requeues the job with ``scontrol requeue <job id>`` (an argument list; the id must fully match
``<digits>`` or ``<digits>_<digits>``), and the run stops by raising :class:`Preempted`, which
``train.py`` turns into a clean exit. Nothing is written inside the signal handler, unlike
Lightning's own SLURM handler, and stale ``hpc_ckpt_*`` files play no part in resuming.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written."""


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id to requeue: ``ARRAYJOB_TASK`` for array jobs, else ``SLURM_JOB_ID``; validated."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"refusing to requeue: malformed SLURM job id {job_id!r}")
    return job_id


TERMINATION_REQUESTS = (signal.SIGTERM, signal.SIGINT)


def after_fit_action(signum: int, previous: Any) -> Any:
    """The action of ``signum`` once a fit that handled no preemption ends: ``previous``, except that
    a warning signal whose previous action was the default (termination, exit 128 + signum) is
    ignored: a finished fit must not die of a late warning. Termination requests keep the default."""
    default = previous is None or previous == signal.SIG_DFL
    if default and signum not in TERMINATION_REQUESTS:
        return signal.SIG_IGN
    return signal.SIG_DFL if previous is None else previous


class Preemption(Callback):
    """Checkpoint at the next step boundary on a signal, requeue, and exit cleanly.

    Args:
        signals: signal names that trigger it (SLURM: ``--signal=SIGUSR1@<seconds>``; SIGTERM is
            what ``scancel`` and most schedulers send first).
        requeue: call ``scontrol requeue`` when running under SLURM.
        scontrol: the ``scontrol`` executable.
        filename: checkpoint file name inside the checkpoint directory.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True,
                 scontrol: str = "scontrol", filename: str = "preempt.ckpt") -> None:
        self.signals = tuple(signals)
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"Preemption: unknown signal {name!r}")
        self.requeue, self.scontrol, self.filename = requeue, scontrol, filename
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: no I/O, no collectives inside a signal handler

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning registered its own handlers (which would checkpoint inside the handler)
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not in the main thread, signal handlers not installed")
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _absorb(self, signum: int, frame: Any) -> None:
        """After a handled preemption: the checkpoint and the requeue are done, exit stays clean."""

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Restore the previous handlers, unless a preemption was handled.

        After a handled preemption a second SIGUSR1/SIGTERM (schedulers repeat them) arrives while
        the process is still winding down; with ``SIG_DFL`` re-armed it would kill the process with
        that signal, which a cluster reads as a killed job although the checkpoint and the requeue
        already happened. Such signals are absorbed until the process exits.

        Without a preemption, a warning signal (SIGUSR1: SLURM's ``--signal=USR1@N`` that arrives
        after the fit ended) whose previous action was the default, which terminates, is ignored
        instead (:func:`after_fit_action`); SIGTERM and SIGINT get their previous action back.
        """
        for signum, handler in self._previous.items():
            if self.received is not None:
                signal.signal(signum, self._absorb)
            else:
                signal.signal(signum, after_fit_action(signum, handler))
        self._previous.clear()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._maybe_stop(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._maybe_stop(trainer, pl_module)

    def _maybe_stop(self, trainer: Trainer, pl_module: LightningModule) -> None:
        flag = torch.tensor(float(self.received is not None), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0.0:
            return
        path = self.checkpoint_path(trainer)
        # collective: every rank takes part. A full checkpoint (optimizer, loops, callbacks) for an
        # exact resume: weights_only=False said explicitly, or Lightning logs that it defaulted to it
        trainer.save_checkpoint(path, weights_only=False)
        rank_zero_info(f"Preemption: signal received, checkpoint written to {path}")
        if trainer.is_global_zero and self.requeue:
            self._requeue()
        raise Preempted(f"preempted at step {trainer.global_step}; checkpoint {path}")

    def checkpoint_path(self, trainer: Trainer) -> Path:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(directory) / self.filename

    def _requeue(self) -> None:
        job_id = slurm_job_id()
        if job_id is None:
            rank_zero_info("Preemption: not a SLURM job, not requeueing")
            return
        result = subprocess.run([self.scontrol, "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            rank_zero_warn(f"Preemption: 'scontrol requeue {job_id}' failed: {result.stderr.strip()}")
        else:
            rank_zero_info(f"Preemption: requeued SLURM job {job_id}")
