"""Shared machinery of difftime's LightningModules.

* Counter-based randomness: step k of the run draws its noise from a generator seeded by
  (seed, k), for the whole global batch, and each rank keeps its slice
  (:class:`~difftime.utils.ShardedNoise`). A resumed run, or the same run on another number of
  devices, draws exactly the same numbers. ``k`` is a buffer, so it is restored with the weights.
* Fault-tolerant steps: a non-finite loss or gradient norm is detected on all ranks together
  before the optimizer step; the step is then skipped everywhere (weights, optimizer moments,
  EMA and LR scheduler unchanged) and counted; after ``max_consecutive_skips`` the run stops
  cleanly, its last checkpoint holding finite weights.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from difftime import checks
from difftime.data import ContinuousScaling, DataScaling
from difftime.utils import Generator, PerSampleNoise, ShardedNoise, Stream, step_seed

_PLAIN = (type(None), bool, int, float, str)


def is_plain(value: Any) -> bool:
    """Only plain types go into checkpoint hyperparameters, so checkpoints load with weights_only."""
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


def _describe(record: dict[str, Any]) -> str:
    sde = dict(record["sde"])
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sde.items() if k != "class")
    return f"{sde['class']}({params}) on data of shape {tuple(record['data_shape'])}"


def curated_keys(logger: TensorBoardLogger) -> None:
    """Drop the ``epoch`` scalar Lightning adds to every training log; file LearningRateMonitor's
    ``lr-<optimizer>`` under ``train/``.

    TensorBoard's default view (Time Series) sorts tag groups (the part before the first '/') by
    name and opens the first two; with these keys they are ``samples`` and ``train``, the sample
    grid and the loss. Step-based runs have no use for ``epoch`` (Lightning adds it unless a
    ``step`` key is logged, and a logged ``step`` would also rename the checkpoints
    ModelCheckpoint writes, so the key is filtered here instead), and ``lr-Adam`` would open as a
    group of its own before ``samples``.
    """
    if getattr(logger, "_curated_keys", False):
        return
    log_metrics = logger.log_metrics

    def filtered(metrics: dict[str, float], step: int | None = None) -> None:
        log_metrics({(f"train/{k}" if k.startswith("lr-") else k): v for k, v in metrics.items() if k != "epoch"},
                    step)

    logger.log_metrics, logger._curated_keys = filtered, True


#: the HParams tab shows the first five metrics, after five hparam columns: the results a run
#: is judged by come first, in this order; other registered metrics follow
KEY_METRICS = ("val/bpd_elbo", "val/fid", "val_kl_gap/T_star", "val_kl_gap/bpd_star", "val/kl_prior_bpd",
               "val/kl_prior_gaussian_bpd", "val/loss", "val/nll_bpd", "val/bpd_ode")


def key_metrics_first(metrics: list[str]) -> list[str]:
    """``metrics`` in :data:`KEY_METRICS` order, the others after in their own order."""
    rank = {name: i for i, name in enumerate(KEY_METRICS)}
    return sorted(metrics, key=lambda name: rank.get(name, len(rank)))


class DiffusionSystem(LightningModule):
    """Base of ScoreModule and AuxPriorModule: counter-based noise and guarded optimizer steps.

    Subclasses call :meth:`guard_loss` on their training loss, implement :meth:`trainable`
    (the module whose gradients are checked) and may override :meth:`after_optimizer_step`.
    """

    def __init__(self, optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 seed: int = 0, max_consecutive_skips: int = 20) -> None:
        super().__init__()
        self.max_consecutive_skips = checks.integer("max_consecutive_skips", max_consecutive_skips, type(self).__name__)
        self.seed = int(seed)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.scaling: DataScaling = ContinuousScaling()
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._consecutive_skips, self._skip_this_step = 0, False
        self._last_loss: Tensor = torch.zeros(())

    def save_plain_hyperparameters(self) -> None:
        """save_hyperparameters, keeping only plain values (the CLI's class_path dicts are plain)."""
        with warnings.catch_warnings():  # modules given directly in Python are dropped just below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(frame=inspect.currentframe().f_back, logger=False)
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if not is_plain(v)])

    def trainable(self) -> nn.Module:
        raise NotImplementedError

    @property
    def data_dim(self) -> int:
        """D, the number of values of one sample (``self.data_shape`` is set by the subclass)."""
        return math.prod(self.data_shape)

    def configure_optimizers(self) -> Any:
        """The optimizer over :meth:`trainable`'s parameters; the scheduler steps every optimizer step."""
        optimizer = self.optimizer_factory(self.trainable().parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ TensorBoard record
    #: scalars the HParams tab shows next to :meth:`run_record` (callbacks add their own
    #: ``hparam_metrics``, e.g. BitsPerDim's ``val/bpd_elbo``)
    hparam_metrics: tuple[str, ...] = ()
    #: custom-scalars charts of this module (callbacks add their own ``scalar_layout``)
    scalar_layout: dict[str, dict[str, list]] = {}
    _record_logged = False

    def run_record(self) -> dict[str, Any]:
        """The flat, readable hyperparameters of the run for TensorBoard's HParams tab.

        Raw ``save_hyperparameters`` output is nested constructor arguments (``sde/init_args/T``,
        ``_instantiator``); this is what a reader compares runs by. Subclasses extend it. The tab
        sorts the keys and ticks the first five, so the names put T, T', data, prior and sampler
        first (upper case sorts before lower case).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        name = type(datamodule).__name__.removesuffix("DataModule") if datamodule is not None else "?"
        shape = "x".join(str(d) for d in self.data_shape)
        record: dict[str, Any] = {"T": float(self.sde.T), "data": f"{name} {shape}", "sde": type(self.sde).__name__,
                                  "sde_eps": float(self.sde.eps),
                                  "train_batch_size": int(getattr(datamodule, "batch_size", 0) or 0),
                                  "train_seed": self.seed}
        if self._trainer is not None and self.trainer.optimizers:
            record["train_lr"] = float(self.trainer.optimizers[0].defaults.get("lr", float("nan")))
        return record

    def _metrics_and_layout(self) -> tuple[list[str], dict[str, dict[str, list]]]:
        metrics, layout = list(self.hparam_metrics), dict(self.scalar_layout)
        for callback in self.trainer.callbacks:
            metrics += [m for m in getattr(callback, "hparam_metrics", ()) if m not in metrics]
            layout.update(getattr(callback, "scalar_layout", {}) or {})
        return key_metrics_first(metrics), layout

    def log_run_record(self) -> None:
        """Write :meth:`run_record`, its metrics and the custom-scalars layout to TensorBoard, once.

        Written directly (``torch.utils.tensorboard.summary.hparams``), not through
        ``logger.log_hyperparams``, which would log each metric at step 0 and, without one, the
        placeholder ``hp_metric = -1``; ``train.py`` turns Lightning's own hparams logging off.
        """
        logger = self.logger if self._trainer is not None else None
        if self._record_logged or not isinstance(logger, TensorBoardLogger) or not self.trainer.is_global_zero:
            return  # fast_dev_run's DummyLogger, no logger, or another logger
        from torch.utils.tensorboard.summary import hparams

        record, (metrics, layout) = self.run_record(), self._metrics_and_layout()
        experiment = logger.experiment
        writer = experiment._get_file_writer()
        for summary in hparams(record, {m: 0.0 for m in metrics}):
            writer.add_summary(summary, self.trainer.global_step)
        if layout:
            experiment.add_custom_scalars(layout)
        if isinstance(logger.hparams, dict):
            logger.hparams.update(record)  # hparams.yaml beside the events: the same record
        curated_keys(logger)
        self._record_logged = True

    def on_fit_start(self) -> None:
        self.log_run_record()

    def on_validation_start(self) -> None:
        self.log_run_record()  # validate: no fit started

    def on_test_start(self) -> None:
        self.log_run_record()

    def on_validation_epoch_end(self) -> None:
        """Validation scalars at ``global_step``, the step the callbacks name their figures and
        files by (Lightning would log them at the number of batches that stepped, one less)."""
        if not self.trainer.sanity_checking:
            self.log("step", float(self.trainer.global_step), on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self.log("step", float(self.trainer.global_step), on_step=False, on_epoch=True)

    def on_validation_end(self) -> None:
        """Forget the logged ``step`` once it is written: ModelCheckpoint names later checkpoints
        by a ``step`` in ``callback_metrics`` (it would reuse this validation's step)."""
        self.trainer.callback_metrics.pop("step", None)

    on_test_end = on_validation_end

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "scaling"):
            self.scaling = datamodule.scaling

    # ------------------------------------------------------------------ randomness
    def step_noise(self, local_batch: int) -> ShardedNoise:
        """This step's noise source (global draws, this rank's slice); also seeds dropout."""
        step = int(self.batches_seen)
        generator = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, Stream.TRAIN_STEP, step))
        torch.manual_seed(step_seed(self.seed, Stream.DROPOUT, step, self.global_rank))  # dropout and the like
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        return ShardedNoise(generator, local_batch * world, rank * local_batch)

    def eval_noise(self, stage: str, batch_idx: int, batch_size: int) -> Generator:
        """Per-sample noise seeded by dataset index: metrics do not depend on batch or world size."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "sample_ids"):
            ids = datamodule.sample_ids(stage, batch_idx).tolist()
            return PerSampleNoise([step_seed(self.seed, Stream.EVAL, i) for i in ids], self.device)
        seed = step_seed(self.seed, Stream.EVAL, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def guard_loss(self, loss: Tensor) -> Tensor:
        """Record the step's loss for the finiteness check and advance the step counter."""
        self.batches_seen += 1
        self._last_loss = loss.detach()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["difftime"] = {"sde": self.sde.hparams(), "data_shape": list(self.data_shape)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a run of another SDE, T or data shape (e.g. a reused run folder)."""
        saved = checkpoint.get("difftime")
        if saved is None:
            return
        current = {"sde": self.sde.hparams(), "data_shape": list(self.data_shape)}
        if saved["sde"] != current["sde"] or list(saved["data_shape"]) != current["data_shape"]:
            raise ValueError(f"the checkpoint was trained with {_describe(saved)} but the config gives "
                             f"{_describe(current)}; resume with the matching config, or start a new run "
                             "(another --trainer.logger.init_args.version)")

    # ------------------------------------------------------------------ guarded steps
    #: why the run stopped early on numerical faults (None: it did not); train.py exits non-zero on it
    fault_stop: str | None = None

    def _stop_on_faults(self, loss_bad: bool) -> None:
        """Stop after ``max_consecutive_skips`` faulty steps, saying why.

        A silent stop with exit status 0 reads as a finished run on a cluster; the reason is
        logged here and kept in :attr:`fault_stop` so that the entry point can fail.
        """
        cause = "loss" if loss_bad else "gradient norm"
        self.fault_stop = (f"stopped after {self._consecutive_skips} consecutive steps with a non-finite {cause} "
                           f"(max_consecutive_skips = {self.max_consecutive_skips}) at step {self.trainer.global_step}; "
                           "the last checkpoint holds the last finite weights")
        rank_zero_warn(f"{type(self).__name__}: {self.fault_stop}")
        self.trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Detect a non-finite loss or gradient on all ranks together, before the step.

        Gradients are already all-reduced (and unscaled under fp16), so their verdict is the same
        on every rank; the loss flag is reduced explicitly. A faulty step is skipped everywhere:
        the gradients are dropped (Adam then updates neither weights nor moments), and the EMA
        and the LR scheduler are not stepped. Under fp16 an overflow with a finite loss is the
        grad scaler's business (it skips the step and lowers the scale), not a fault.
        """
        grads = [p.grad for p in self.trainable().parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float() if grads else torch.zeros((), device=self.device)
        loss_flag = (~torch.isfinite(self._last_loss.to(self.device))).float()
        loss_bad = bool(self.trainer.strategy.reduce(loss_flag, reduce_op="sum") > 0)
        grad_bad = not bool(torch.isfinite(norm))
        self._skip_this_step = loss_bad or grad_bad
        overflow = grad_bad and not loss_bad and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if self._skip_this_step:
            optimizer.zero_grad(set_to_none=True)
        if self._skip_this_step and not overflow:
            self.skipped_steps += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self.max_consecutive_skips:
                self._stop_on_faults(loss_bad)
        elif not self._skip_this_step:
            self._consecutive_skips = 0
            self.log("train/grad_norm", norm)
        self.log("train/skipped_steps", self.skipped_steps.float())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self._skip_this_step:
            self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that was not skipped (EMA updates go here)."""

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not self._skip_this_step:
            super().lr_scheduler_step(scheduler, metric)
