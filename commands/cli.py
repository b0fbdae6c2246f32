"""The training command line: ``python train.py {fit,validate,test,predict} --config ...`` (``difftime-train``).

A LightningCLI: every module, datamodule, callback, SDE, network, loss and sampler is injected
by ``class_path``/``init_args`` from layered YAML (``--config base.yaml --config exp.yaml``).

What this entry point adds to LightningCLI:

* Values out of range fail before any process group starts or device memory is allocated, with
  the full config key in the message (``config key 'model.init_args.sde.init_args.T' ...``):
  constructor checks, a global batch that does not divide by the devices, a non-positive
  learning rate, an unwritable checkpoint folder, and every callback's ``check_config``.
* ``--ckpt_path``: the file is CRC-verified and loaded weights-only before anything else, and
  nothing named inside it is imported. The trained model (network, training SDE, data shape)
  comes from the checkpoint; the evaluation (sampler, steps, prior, callbacks, T') comes from the
  command line; a command-line value that contradicts the checkpoint is an error naming the key
  and both values. (LightningCLI's own ``_parse_ckpt_path`` silently overwrote the command line.)
* A mistyped key is one line naming the full key and the closest valid one (``did you mean``);
  option prefixes are never expanded (``--trainer.max_step`` is not ``max_steps``); the
  ``limit_*_batches`` and ``overfit_batches`` counts stay counts (``1`` is one batch, ``1.0`` all).
  Every config error is reported before any checkpoint problem.
* A stable run directory ``<save_dir>/<name>/<version>`` locked by one ``fit`` at a time
  (:mod:`commands.run_folder`): a fit into a folder that already holds a run resumes it from
  the newest valid checkpoint and says so after Lightning's banner (run, step; nothing left to
  train at ``max_steps``), so a requeued job resumes with the same command; ``--ckpt_path last``
  with an auto-numbered logger version continues the latest existing version. Corrupt
  checkpoints are moved aside to ``<name>.corrupt``; if every checkpoint is invalid the run
  refuses to start unless ``--fresh_start true``. Orphan temp files are removed.
* The training config is written once (``config.yaml``); a resumed ``fit`` and every
  ``validate/test/predict`` write ``config-<subcommand>-<time>.yaml`` next to it, and
  evaluations log into ``<run>/<subcommand>-<time>/`` at the checkpoint's step.
* TensorBoard continues the same run after a resume: events after the checkpoint's step are
  purged (``purge_step``), so no step is shown twice.
* Checkpoints are written atomically and verified before loading (SafeCheckpointIO); SLURM
  preemption is handled by the Preemption callback at a step boundary (Lightning's own SLURM
  handler, which checkpoints inside the signal handler, is disabled). A run stopped by
  ``max_consecutive_skips`` exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from commands.checkpoint_io import KeepLastCheckpointName, SafeCheckpointIO
from callbacks.preemption import Preempted, Preemption
from callbacks.support.progress import DifftimeProgressBar
from commands.config_errors import (CliError, CliFailed, check_writable, config_error, constructor_error, find_key,
                                    one_line)
from commands.config_files import configs_root, resolve_config_args
from commands.run_folder import LOCKS, STAMP_ENV, RunConfigWriter, RunFolder, is_first_process
from commands.runs import checkpoint_conflicts
from datamodules.base import DataNotFoundError

__all__ = ["CliError", "CliFailed", "DifftimeCLI", "RunConfigWriter", "build_cli", "cli_main", "main"]

FAULT_EXIT = 3  # exit status of a run stopped by max_consecutive_skips


def _names(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def help_text() -> str:
    """What ``train.py fit --help`` says first: where to start, before 500 lines of options."""
    root = configs_root()
    return (
        "Start from a shipped config (each header states its seconds per step on 2 CPU cores and its run time):\n"
        f"  configs/<name>.yaml      {_names(root)}\n"
        "                           e.g. --config configs/quickstart.yaml (a ~9-minute CPU fit on real digits)\n"
        "  configs/aux/<name>.yaml  auxiliary priors nu ~ q_T (stage 1 of the paper's recipe):\n"
        f"                           {_names(root / 'aux')}\n"
        f"  configs/T/<T>.yaml       the diffusion time T, added after a base config: {_names(root / 'T')}\n"
        "The score model's own arguments and the networks in difftime:\n"
        "  --model.help lightning_modules.ScoreModule    (the auxiliary prior: lightning_modules.AuxPriorModule)\n"
        "The resolved config of a command: --print_config. Any key can be set: --model.init_args.sde.init_args.T 0.4\n"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with descriptions printed as written."""


class CountingTrainer(Trainer):
    """Lightning's Trainer with the ``limit_*_batches`` typed count first (``int | float``).

    Lightning types them ``float | int``, so the parser turned ``--trainer.limit_val_batches 1``
    and ``limit_val_batches: 1`` into ``1.0``, i.e. *all* batches. Here ``1`` is one batch and
    ``1.0`` all of them, as Lightning's own docs read.
    """

    def __init__(self, *, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches, **kwargs)


class DifftimeParser(LightningArgumentParser):
    """Refusals as one line (:func:`commands.config_errors.one_line`), raised as :class:`CliFailed`.

    Option prefixes are never expanded (``allow_abbrev=False``): ``--trainer.max_step 10`` is an
    unknown option, not ``max_steps``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise CliFailed(one_line(message, _option_strings(parser)))


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommand parsers."""
    found = [o for o in parser._option_string_actions if o.startswith("--")]
    for action in parser._actions:
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            found += _option_strings(sub)
    return found


class DifftimeCLI(RunFolder, LightningCLI):
    """LightningCLI with the config checks of this module and the run folder of :mod:`commands.run_folder`."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Every parser keeps the line breaks of its description (the config list of :func:`help_text`)."""
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.usage = "%(prog)s --config CONFIG.yaml [--config MORE.yaml ...] [--KEY VALUE ...]"
        parser.description = help_text()
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_argument("--fresh_start", type=bool, default=False,
                            help="fit: when every checkpoint of the run folder is invalid, start from step 0 "
                                 "instead of refusing (a valid checkpoint is still resumed)")

    # ------------------------------------------------------------------ instantiation and early checks
    def instantiate_classes(self) -> None:
        """Build everything; the config's own errors first, then the checkpoint's, then the run folder."""
        try:
            super().instantiate_classes()
            self._check_before_work()
        except CliFailed:
            raise
        except (CliError, DataNotFoundError) as error:
            self._fail(error)
        except Exception as raised:
            self._fail(self._refusal(raised))
        if self.subcommand == "fit":
            self._take_run_folder()

    def _refusal(self, raised: Exception) -> str:
        """The one-line reason a constructor refused the config (with the full key), or re-raise."""
        error = config_error(raised)
        if error is None:
            reason = constructor_error(raised)
            if reason is None:
                raise raised
            return reason
        config = self.config[self.subcommand] if self.subcommand else self.config
        key = find_key(config.as_dict(), error)
        return str(error.with_prefix(key[: -len(error.key)]) if key else error)

    def _check_before_work(self) -> None:
        """Everything that would otherwise fail after the process group started or hours in."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        world = self.trainer.num_devices * self.trainer.num_nodes
        if self.datamodule is not None and hasattr(self.datamodule, "check_world_size"):
            self.datamodule.check_world_size(world)
        if self.datamodule is not None and hasattr(self.datamodule, "check_data"):
            self.datamodule.check_data()  # files missing with download: false (DataNotFoundError)
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_config"):
                callback.check_config(self.trainer, self.model)
        if self.subcommand == "fit":
            self._check_learning_rate(config.model.as_dict())
            self._check_checkpoint_folder(config)
        self.raise_deferred()  # the checkpoint's problems, once the config itself is valid
        self._check_data_shape()

    def _check_data_shape(self) -> None:
        conflicts = checkpoint_conflicts({"difftime": self.checkpoint_record or {}},
                                         data_shape=getattr(self.model, "data_shape", None))
        if conflicts:
            raise CliError("; ".join(conflicts))

    @staticmethod
    def _check_learning_rate(model: dict[str, Any]) -> None:
        optimizer = (model.get("init_args") or {}).get("optimizer")
        lr = ((optimizer or {}).get("init_args") or {}).get("lr") if isinstance(optimizer, dict) else None
        if isinstance(lr, (int, float)) and not lr > 0:
            raise CliError(f"config key 'model.init_args.optimizer.init_args.lr' = {lr} is invalid: allowed lr > 0")

    def _check_checkpoint_folder(self, config: Any) -> None:
        callbacks = config.trainer.get("callbacks") or []
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
            if dirpath:
                return check_writable(Path(dirpath), f"trainer.callbacks.{i}.init_args.dirpath")
        logger = self._logger_config(config)
        if logger is not None:
            target = self.run_dir or Path(logger.init_args.get("save_dir") or ".")
            return check_writable(target / "checkpoints" if self.run_dir else target, "trainer.logger.init_args.save_dir")
        check_writable(Path(config.trainer.get("default_root_dir") or os.getcwd()), "trainer.default_root_dir")

    def instantiate_trainer(self, **kwargs: Any):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, SafeCheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))  # Preemption does it at a step boundary
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """DifftimeProgressBar is the default progress bar (a global ETA to ``max_steps``, plain
        lines outside a terminal), unless the config names another or disables the bar."""
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        wanted = config.get("enable_progress_bar") is not False
        if wanted and not any(isinstance(c, ProgressBar) for c in [*given, *callbacks]):
            callbacks = [*callbacks, DifftimeProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    # ------------------------------------------------------------------ running
    def after_fit(self) -> None:
        """A run stopped by ``max_consecutive_skips`` fails, so a scheduler does not read it as done."""
        reason = getattr(self.model, "fault_stop", None)
        if reason:
            print(f"train.py: error: {reason}", file=sys.stderr)
            raise SystemExit(FAULT_EXIT)


PRIOR_KEY = "--model.init_args.prior"
PRIOR_CHECKPOINT = "difftime.aux_priors.AuxPriorCheckpoint"


def expand_prior_checkpoint(argv: list[str]) -> list[str]:
    """``--model.init_args.prior X.ckpt`` (or ``=X.ckpt``) as ``AuxPriorCheckpoint`` with ``path X.ckpt``.

    The short form a reader tries first for stage 2 of the recipe (the auxiliary prior nu ~ q_T,
    Franzese et al. 2023, Sec. 4). jsonargparse reads an existing file given to a class-typed
    argument as a YAML config, so a checkpoint failed with "'utf-8' codec can't decode byte 0x80".
    """
    expanded, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value, step = (arg.split("=", 1)[1], 1) if arg.startswith(PRIOR_KEY + "=") else (None, 1)
        if arg == PRIOR_KEY and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        if value is not None and value.endswith(".ckpt"):
            expanded += [PRIOR_KEY, PRIOR_CHECKPOINT, f"{PRIOR_KEY}.path", value]
        else:
            expanded += argv[i:i + step]
        i += step
    return expanded


def build_cli(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DifftimeCLI:
    """The command (``args`` as on the command line, or a config dict) as :func:`main` runs it, but a
    refused command line raises :class:`CliFailed` instead of exiting."""
    if isinstance(args, list):
        args = expand_prior_checkpoint(args)
    try:
        return DifftimeCLI(
            args=args,
            run=run,
            # enable_autolog_hparams: the modules log a flat record instead of the raw constructor
            # arguments and the placeholder hp_metric = -1 (DiffusionSystem.log_run_record)
            trainer_defaults={"use_distributed_sampler": False, "enable_autolog_hparams": False,
                              "callbacks": [Preemption(), KeepLastCheckpointName()]},
            save_config_callback=RunConfigWriter,
            auto_configure_optimizers=False,
            trainer_class=CountingTrainer,
            parser_class=DifftimeParser,
        )
    finally:
        while LOCKS:
            LOCKS.pop().release()
        if is_first_process():
            os.environ.pop(STAMP_ENV, None)  # the next in-process invocation gets its own time


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DifftimeCLI:
    """``train.py`` in-process: a refused command line is one line ``train.py: error: ...`` on stderr
    and ``SystemExit(2)``, before any work."""
    try:
        return build_cli(args, run)
    except (CliFailed, DataNotFoundError) as failure:  # DataNotFoundError: a failed download in prepare_data
        print(f"train.py: error: {failure}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main() -> None:
    """``python train.py ...`` and the ``difftime-train`` console entry point."""
    try:
        sys.argv[1:] = expand_prior_checkpoint(resolve_config_args(sys.argv[1:]))
        main()
    except Preempted as stop:
        print(f"train.py: {stop}; exiting cleanly", file=sys.stderr)
        raise SystemExit(0)
