"""Progress for everything that takes more than a few seconds, in a terminal and in a log file.

* :class:`DifftimeProgressBar` is the default progress bar of ``train.py``: Lightning's tqdm bar,
  except that the fit bar counts optimizer steps to the end of the run (``max_steps``, or the
  steps ``max_epochs`` implies) with its ETA, and says when ``max_time`` ends the run first.
  Callbacks open nested bars below it with :func:`progress_for` (sample grids, FID generation,
  likelihood loops), so a grid drawn at step 1000 no longer freezes the bar for minutes.
* When the output is not a terminal (``nohup``, CI, SLURM logs) every bar becomes a
  :class:`LineBar`: one plain line every ``interval`` seconds or every 10 %, never a stream of
  carriage returns (a tqdm bar redrawn for hours under ``nohup`` is one multi-megabyte line).
* Quiet mode is Lightning's: ``--trainer.enable_progress_bar false`` disables every bar,
  nested ones included; only rank zero draws.

:class:`SamplingProgress` turns the samplers' per-step ``callback({"i", "t", "x", "nfe"})`` and the
per-batch hook of :func:`difftime.utils.generate_indexed` into one bar over all sampler steps.
"""

from __future__ import annotations

import io
import math
import sys
import time
from typing import Any, TextIO

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

#: seconds between two plain progress lines (non-terminal output)
LINE_INTERVAL_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (tqdm may redraw in place)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineBar(Tqdm):
    """A tqdm bar that prints plain lines to ``stream`` instead of redrawing one line.

    A line is printed at the start, then when ``interval`` seconds have passed or the bar crossed
    another 10 % of its total, and once at the end. tqdm's own output (carriage returns, cursor
    moves) goes to a null sink, so the log holds only these lines.
    """

    def __init__(self, *args: Any, stream: TextIO | None = None, interval: float = LINE_INTERVAL_S,
                 **kwargs: Any) -> None:
        self._stream = stream or sys.stdout
        self._interval = float(interval)
        self._last: tuple[float, int, int] | None = None  # (time, n, tenth) of the last line
        self._closing = False
        # every update reaches display(), which applies this bar's own throttle
        kwargs.update(file=io.StringIO(), dynamic_ncols=False, ncols=80, mininterval=0, miniters=1)
        super().__init__(*args, **kwargs)

    def line(self) -> str:
        """``desc: 40% 80/200 step [00:31<00:46, 2.6 step/s, postfix]`` (percentage only with a total)."""
        d = self.format_dict
        total, n, unit = d["total"], d["n"], d["unit"]
        elapsed = self.format_interval(d["elapsed"])
        rate = n / d["elapsed"] if d["elapsed"] > 0 else 0.0
        rate_text = f"{rate:.3g} {unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{unit}"
        if total:
            remaining = self.format_interval((total - n) / rate) if rate > 0 else "?"
            head = f"{100 * n / total:3.0f}% {n}/{total} {unit} [{elapsed}<{remaining}, {rate_text}"
        else:
            head = f"{n} {unit} [{elapsed}, {rate_text}"
        postfix = f", {d['postfix']}" if d.get("postfix") else ""
        desc = str(d["prefix"] or self.desc or "").rstrip(": ")
        return f"{desc}: {head}{postfix}]"

    def _due(self) -> bool:
        now, tenth = time.monotonic(), self._tenth()
        if self._last is None:
            return self.n > 0  # a bar just created (its total often not yet set) says nothing
        last_t, last_n, last_tenth = self._last
        if self._closing:
            return self.n != last_n
        return now - last_t >= self._interval or tenth > last_tenth

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total and math.isfinite(self.total) else -1

    @override
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.disable and not self._closing:  # tqdm clearing a line: nothing to clear in a log
            return True
        if self._due():
            self._stream.write(self.line() + "\n")
            self._stream.flush()
            self._last = (time.monotonic(), self.n, self._tenth())
        return True

    @override
    def close(self) -> None:
        if not self.disable and self._last is not None:
            self._closing = True
            self.display()
        super().close()


def progress_bar(desc: str, total: float | None, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None, position: int = 0, leave: bool = False) -> Tqdm:
    """A tqdm bar on a terminal, a :class:`LineBar` otherwise, a disabled bar when not ``enabled``."""
    stream = stream or sys.stdout
    total = total if total is None or math.isfinite(total) else None
    if not enabled:
        return Tqdm(disable=True)
    if is_terminal(stream):
        return Tqdm(desc=desc, total=total, unit=unit, position=position, leave=leave, file=stream,
                    dynamic_ncols=True)
    return LineBar(desc=desc, total=total, unit=unit, stream=stream)


class DifftimeProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar with a global fit bar and plain lines outside a terminal.

    The fit bar runs from the resumed step to ``trainer.estimated_stepping_batches`` (``max_steps``
    or the steps ``max_epochs`` implies) without resetting at each epoch, so its ETA is the ETA
    of the run; with ``max_time`` the postfix says how long the time budget has left.

    Args:
        refresh_rate: update the bars every n batches (terminal only).
        interval: seconds between plain lines when the output is not a terminal.
    """

    def __init__(self, refresh_rate: int = 1, interval: float = LINE_INTERVAL_S) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.interval = float(interval)

    # ------------------------------------------------------------------ bars
    def _bar(self, **kwargs: Any) -> Tqdm:
        if self.is_disabled or is_terminal(sys.stdout):
            return Tqdm(disable=self.is_disabled, file=sys.stdout, **kwargs)
        kwargs.pop("dynamic_ncols", None)
        return LineBar(stream=sys.stdout, interval=self.interval, **kwargs)

    def _kwargs(self, desc: str, position: int, leave: bool) -> dict[str, Any]:
        return dict(desc=desc, position=2 * self.process_position + position, leave=leave, dynamic_ncols=True,
                    bar_format=self.BAR_FORMAT)

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(**self._kwargs(self.sanity_check_description, 0, False))

    @override
    def init_train_tqdm(self) -> Tqdm:
        return self._bar(**self._kwargs("fit", 0, True), smoothing=0.05, unit="step")

    @override
    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._bar(**self._kwargs(self.validation_description, int(has_main_bar), not has_main_bar))

    @override
    def init_test_tqdm(self) -> Tqdm:
        return self._bar(**self._kwargs("Testing", 0, True))

    @override
    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(**self._kwargs(self.predict_description, 0, True))

    def nested(self, desc: str, total: float | None, unit: str = "it") -> Tqdm:
        """A bar below the ones shown now, for a callback's long loop (closed by the caller)."""
        if self.is_disabled:
            return Tqdm(disable=True)
        live = [b for b in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar,
                            self._predict_progress_bar) if b is not None and not b.disable]
        total = total if total is None or math.isfinite(total) else None
        return self._bar(**self._kwargs(desc, len(live), False), total=total, unit=unit)

    # ------------------------------------------------------------------ predict: per sampler step
    @override
    def on_predict_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """One batch of ``train.py predict`` is a whole sampler run: show its steps (the predict
        bar alone sat at 0/1 for minutes)."""
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if hasattr(pl_module, "step_callback") and not self.is_disabled:
            bar = self.nested(f"predict batch {batch_idx}", planned_steps(getattr(pl_module, "sampler", None), None),
                              "step")
            self._sampling = SamplingProgress(bar, len(batch))
            pl_module.step_callback = self._sampling.step

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        sampling = getattr(self, "_sampling", None)
        if sampling is not None:
            sampling.bar.close()
            pl_module.step_callback, self._sampling = None, None
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ the global fit bar
    @override
    def on_train_start(self, trainer: Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        total = trainer.estimated_stepping_batches
        self.train_progress_bar.total = total if math.isfinite(total) else None
        self.train_progress_bar.initial = 0
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.refresh()

    @override
    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"fit (epoch {trainer.current_epoch})", refresh=False)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or not self._should_update(n, bar.total or 0):
            return
        postfix = self.get_metrics(trainer, pl_module)
        left = time_left(trainer)
        if left is not None:
            postfix["max_time in"] = Tqdm.format_interval(left)
        bar.n = n
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    @override
    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        """Lightning's bar metrics without ``v_num`` (the run folder is named in the log)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def time_left(trainer: Trainer) -> float | None:
    """Seconds until ``max_time`` stops the fit (None without a time budget)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or timer._duration is None:
        return None
    return max(0.0, float(timer.time_remaining("train") or 0.0))


def progress_for(trainer: Trainer | None, desc: str, total: float | None, unit: str = "it") -> Tqdm:
    """A bar for a callback's loop that follows the Trainer's progress-bar setting.

    Disabled on ranks other than zero and when the Trainer has no progress bar
    (``enable_progress_bar=false``); nested under :class:`DifftimeProgressBar`, a plain bar
    (or lines) under another progress bar.
    """
    owner = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if owner is None or not trainer.is_global_zero or not getattr(owner, "is_enabled", True):
        return Tqdm(disable=True)
    if isinstance(owner, DifftimeProgressBar):
        return owner.nested(desc, total, unit)
    return progress_bar(desc, total, unit)


def planned_steps(sampler: Any, steps: int | None) -> int | None:
    """Steps a sampler call will take (None for an adaptive solver, which chooses its own)."""
    if sampler is None or "steps" not in vars(sampler):
        return None
    return int(steps if steps is not None else sampler.steps)


class SamplingProgress:
    """One bar over the sampler steps of every batch of a generation.

    ``step`` is the samplers' ``callback`` (called after each step, or each function evaluation
    of the adaptive solver); ``batch`` is :func:`difftime.utils.generate_indexed`'s ``progress``.
    Use as a context manager so the bar is closed even when sampling fails.
    """

    def __init__(self, bar: Tqdm, n_samples: int) -> None:
        self.bar, self.n_samples, self.done, self.nfe = bar, n_samples, 0, 0

    @classmethod
    def open(cls, trainer: Trainer | None, desc: str, n_samples: int, batch_size: int, sampler: Any,
             steps: int | None, bar: Tqdm | None = None) -> "SamplingProgress":
        per_batch = planned_steps(sampler, steps)
        total = per_batch * math.ceil(n_samples / batch_size) if per_batch else None
        return cls(bar if bar is not None else progress_for(trainer, desc, total, "step"), n_samples)

    def step(self, info: dict[str, Any]) -> None:
        self.nfe = int(info.get("nfe", self.nfe))
        if not self.bar.disable:
            self.bar.set_postfix_str(f"samples {self.done}/{self.n_samples}, NFE {self.nfe}", refresh=False)
            self.bar.update(1)

    def batch(self, done: int, total: int) -> None:
        self.done = done
        if not self.bar.disable:
            self.bar.set_postfix_str(f"samples {done}/{total}, NFE {self.nfe}")

    def __enter__(self) -> "SamplingProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
