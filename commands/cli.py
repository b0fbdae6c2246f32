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
* A stable run directory ``<save_dir>/<name>/<version>`` locked by one ``fit`` at a time: a
  requeued job (same command) resumes automatically from the newest valid checkpoint there;
  ``--ckpt_path last`` does the same and, with an auto-numbered logger version, continues the
  latest existing version instead of silently starting a new one from scratch. Corrupt
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
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks.checkpoint_io import KeepLastCheckpointName, SafeCheckpointIO
from callbacks.preemption import Preempted, Preemption
from callbacks.progress import DifftimeProgressBar
from commands.run_lock import RunFolderLock, RunFolderLocked
from commands.runs import RunError, checkpoint_conflicts, load_checkpoint
from difftime.checkpoints import (CorruptCheckpointError, checkpoint_step, check_loadable, quarantine,
                                  remove_orphan_temp_files, scan_checkpoints)
from difftime.utils import ConfigError

FAULT_EXIT = 3  # exit status of a run stopped by max_consecutive_skips
_LOCKS: list[RunFolderLock] = []  # released by main(), also when it raises
_STAMP_ENV = "DIFFTIME_RUN_STAMP"  # inherited by DDP worker processes: one name for all ranks


class CliError(RuntimeError):
    """A problem with what the user asked for, reported as one line before any work."""


class CliFailed(Exception):
    """The command line was refused before any work; ``str()`` is the one-line reason.

    :func:`main` prints it as ``train.py: error: <reason>`` and exits with status 2;
    :func:`build_cli` raises it, so other commands (``sample.py``) report it as their own.
    """


def _find_key(config: Any, error: ConfigError, path: str = "") -> str | None:
    """Config path of the ``init_args`` entry that raised ``error`` (matched by class and key)."""
    if isinstance(config, dict):
        class_path = str(config.get("class_path", ""))
        init_args = config.get("init_args") or {}
        if error.owner and class_path.rsplit(".", 1)[-1] == error.owner and error.key in init_args:
            return f"{path}init_args.{error.key}"
        for key, value in config.items():
            found = _find_key(value, error, f"{path}{key}.")
            if found:
                return found
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            found = _find_key(value, error, f"{path}{i}.")
            if found:
                return found
    return None


def _config_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception (jsonargparse wraps errors raised in constructors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _constructor_error(error: BaseException) -> str | None:
    """The reason a constructor gave, when jsonargparse wrapped it in a many-line Union dump.

    jsonargparse reports a ``ValueError`` raised while instantiating a ``class_path`` as one error
    per Union subtype, with the whole namespace; the constructor's own message (the innermost
    ``ValueError`` of the chain, e.g. an auxiliary prior trained at another T) is the one line
    that matters. Anything else is a bug and keeps its traceback.
    """
    innermost, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        innermost = error
        error = error.__cause__ or error.__context__
    if innermost is None or not isinstance(innermost, ValueError) or "\n" in str(innermost):
        return None
    return str(innermost)


def _latest_version(root: Path) -> str | None:
    versions = [(int(m.group(1)), p.name) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions)[1] if versions else None


def _stamp() -> str:
    """Time stamp naming this invocation's config and evaluation folder (shared by all ranks)."""
    return os.environ.setdefault(_STAMP_ENV, time.strftime("%Y%m%d-%H%M%S"))


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: Path, key: str) -> None:
    """The folder (or the nearest existing parent it will be created in) must be writable."""
    existing = _first_existing(Path(directory))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"config key '{key}': the checkpoint folder {directory} cannot be created or written "
                       f"({existing} is {'not writable' if existing.is_dir() else 'not a folder'})")


def _is_first_process() -> bool:
    """Rank 0 of the job (DDP workers and other SLURM tasks do not take the run lock)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class RunConfigWriter(SaveConfigCallback):
    """Write the resolved config of this invocation without ever replacing another.

    The first ``fit`` of a run writes ``config.yaml``; a resumed ``fit`` and every
    ``validate/test/predict`` write ``config-<subcommand>-<time>.yaml`` next to it, so the
    training config of a run is kept (a ``predict`` config in its place made the README's
    ``validate --config <run>/config.yaml`` fail). Evaluations log into a sub-folder of the run
    (TensorBoard ``sub_dir``); the config still goes to the run folder itself.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            run_dir = Path(log_dir).parent if getattr(trainer.logger, "sub_dir", None) else Path(log_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            path = self._target(run_dir, str(getattr(stage, "value", stage)))
            with warnings.catch_warnings():  # skip_none: as LightningCLI itself saves (keeps nulls)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.parser.save(self.config, str(path), skip_none=False, overwrite=False, multifile=self.multifile)
        self.already_saved = trainer.strategy.broadcast(True)

    @staticmethod
    def _target(run_dir: Path, stage: str) -> Path:
        if stage == "fit" and not (run_dir / "config.yaml").exists():
            return run_dir / "config.yaml"
        base, n = f"config-{stage}-{_stamp()}", 0
        path = run_dir / f"{base}.yaml"
        while path.exists():
            n += 1
            path = run_dir / f"{base}-{n}.yaml"
        return path


def _names(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def help_text() -> str:
    """What ``train.py fit --help`` says first: where to start, before 500 lines of options."""
    from configs import ROOT as CONFIGS

    return (
        "Start from a shipped config (each header states its seconds per step on 2 CPU cores and its run time):\n"
        f"  configs/<name>.yaml      {_names(CONFIGS)}\n"
        "                           e.g. --config configs/quickstart.yaml (a ~9-minute CPU fit on real digits)\n"
        "  configs/aux/<name>.yaml  auxiliary priors nu ~ q_T (stage 1 of the paper's recipe):\n"
        f"                           {_names(CONFIGS / 'aux')}\n"
        f"  configs/T/<T>.yaml       the diffusion time T, added after a base config: {_names(CONFIGS / 'T')}\n"
        "The score model's own arguments and the networks in difftime:\n"
        "  --model.help lightning_modules.ScoreModule    (the auxiliary prior: lightning_modules.AuxPriorModule)\n"
        "The resolved config of a command: --print_config. Any key can be set: --model.init_args.sde.init_args.T 0.4\n"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with descriptions printed as written."""


class DifftimeCLI(LightningCLI):
    run_dir: Path | None = None
    checkpoint_step: int | None = None  # global step of the --ckpt_path checkpoint
    checkpoint_record: dict[str, Any] | None = None  # its "difftime" entry (SDE, data shape)

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

    # ------------------------------------------------------------------ checkpoint and run directory
    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's: verify, compare, import nothing, overwrite nothing.

        Runs before the classes are instantiated: the resume checkpoint of ``fit`` is chosen
        here, and the chosen file is verified and compared with the command line.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        self._corrupt: list[Path] = []
        try:
            if subcommand == "fit":
                self.run_dir = self._pin_run_dir(config)
                self._resolve_resume(config)
            else:
                self._evaluation_dir(config, subcommand)
            ckpt = config.get("ckpt_path")
            if ckpt and (subcommand == "fit" or ckpt not in ("last", "best", "hpc", "registry")):
                self._apply_checkpoint(config, Path(ckpt), subcommand)
        except (CliError, RunError, CorruptCheckpointError, FileNotFoundError) as error:
            self._fail(error)

    @staticmethod
    def _fail(error: BaseException | str) -> NoReturn:
        raise CliFailed(str(error)) from None

    def _logger_config(self, config: Any) -> Any | None:
        logger = config.trainer.get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        if logger is None or isinstance(logger, bool) or "TensorBoardLogger" not in str(logger.get("class_path", "")):
            return None
        return logger

    def _pin_run_dir(self, config: Any) -> Path | None:
        """Run directory save_dir/name/version; an unset version is pinned when resuming."""
        logger = self._logger_config(config)
        if logger is None:
            root = config.trainer.get("default_root_dir") or os.getcwd()
            return Path(root)
        args = logger.init_args
        root = Path(args.get("save_dir") or ".") / (args.get("name") or "lightning_logs")
        if args.get("version") in (None, ""):
            slurm_job = os.environ.get("SLURM_JOB_ID")
            latest = _latest_version(root)
            if slurm_job:
                args.version = f"slurm-{slurm_job}"
            elif config.get("ckpt_path") == "last" and latest is not None:
                args.version = latest  # continue the latest run, never a new empty one
            else:
                return None  # a fresh auto-numbered run: nothing to resume
        version = args.version if isinstance(args.version, str) else f"version_{args.version}"
        return root / version

    def _evaluation_dir(self, config: Any, subcommand: str) -> None:
        """validate/test/predict log into ``<run>/<subcommand>-<time>/``, never into the training
        run's own event files, and no evaluation overwrites the outputs of another."""
        logger = self._logger_config(config)
        if logger is not None and not logger.init_args.get("sub_dir"):
            logger.init_args.sub_dir = f"{subcommand}-{_stamp()}"

    def _resolve_resume(self, config: Any) -> None:
        requested = config.get("ckpt_path")
        if requested not in (None, "last"):
            config.ckpt_path = str(self._explicit_fit_checkpoint(Path(requested)))
            self._purge_after(config, Path(config.ckpt_path))
            return
        if self.run_dir is None:
            config.ckpt_path = None
            return
        ckpt_dir = self.run_dir / "checkpoints"
        scan = scan_checkpoints(ckpt_dir)
        for path, reason in scan.invalid:
            warnings.warn(f"skipping unusable checkpoint {path}: {reason}", stacklevel=2)
        self._corrupt += [path for path, _ in scan.invalid]
        if scan.chosen is None:
            if scan.invalid and not config.get("fresh_start"):
                names = ", ".join(str(p) for p, _ in scan.invalid)
                raise CliError(f"every checkpoint of the run folder {self.run_dir} is invalid ({names}); "
                               "refusing to restart it from step 0. Pass --fresh_start true to start over "
                               "(the invalid files are moved aside to <name>.corrupt), or choose another "
                               "--trainer.logger.init_args.version")
            config.ckpt_path = None
            return
        print(f"train.py: resuming from {scan.chosen} (newest valid checkpoint of this run; choose another "
              "--trainer.logger.init_args.version to start a new run)", file=sys.stderr)
        config.ckpt_path = str(scan.chosen)
        self._purge_after(config, scan.chosen)

    def _explicit_fit_checkpoint(self, path: Path) -> Path:
        """An explicit corrupt ``--ckpt_path`` falls back to the newest valid checkpoint *before*
        it (lower step, same folder), never to a newer one; none: refuse."""
        try:
            check_loadable(path)
            return path
        except CorruptCheckpointError as error:
            match = re.search(r"step=(\d+)", path.name)
            below = int(match.group(1)) if match and path.name != "last.ckpt" else None
            scan = scan_checkpoints(path.parent, below=below, exclude=(path,))
            if scan.chosen is None:
                raise CliError(f"{error}; no valid checkpoint before it in {path.parent}") from None
            warnings.warn(f"{error}; falling back to {scan.chosen}, the newest valid checkpoint before it", stacklevel=2)
            self._corrupt += [path] + [p for p, _ in scan.invalid]
            return scan.chosen

    def _apply_checkpoint(self, config: Any, path: Path, subcommand: str) -> None:
        """Verify the checkpoint, and refuse a command line that contradicts its trained model."""
        if not path.is_file():
            raise CliError(f"--ckpt_path {path}: checkpoint not found")
        try:
            state = load_checkpoint(path, mmap=True)
        except CorruptCheckpointError as error:
            if subcommand == "fit":
                raise
            before = scan_checkpoints(path.parent, exclude=(path,)).chosen
            hint = f"; the newest other valid checkpoint there is {before}" if before else ""
            raise CliError(f"{error}; refusing to {subcommand} it{hint}") from None
        self.checkpoint_step = int(state.get("global_step", 0))
        self.checkpoint_record = state.get("difftime")
        conflicts = checkpoint_conflicts(state, config.model.as_dict())
        if conflicts:
            raise CliError(f"{'; '.join(conflicts)}. The trained model (network, training SDE, data shape) comes "
                           f"from the checkpoint {path}: drop the override, or start a new run")

    def _purge_after(self, config: Any, ckpt: Path) -> None:
        """TensorBoard hides the events the interrupted run logged after the checkpoint.

        Batch k (0-based) logs its training metrics at step k and the checkpoint taken after it
        holds global_step k + 1, so everything at steps >= global_step is redone by the resumed run.
        """
        logger = self._logger_config(config)
        if logger is not None:
            dict_kwargs = logger.get("dict_kwargs") or {}
            dict_kwargs["purge_step"] = checkpoint_step(ckpt)
            logger["dict_kwargs"] = dict_kwargs

    # ------------------------------------------------------------------ instantiation and early checks
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            self._check_before_work()
        except CliError as error:
            self._fail(error)
        except Exception as raised:
            error = _config_error(raised)
            if error is None:
                reason = _constructor_error(raised)
                if reason is None:
                    raise
                self._fail(reason)
            config = self.config[self.subcommand] if self.subcommand else self.config
            key = _find_key(config.as_dict(), error)
            message = error.with_prefix(key[: -len(error.key)]) if key else error
            self._fail(message)
        if self.subcommand == "fit":
            self._take_run_folder()

    def _check_before_work(self) -> None:
        """Everything that would otherwise fail after the process group started or hours in."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        world = self.trainer.num_devices * self.trainer.num_nodes
        if self.datamodule is not None and hasattr(self.datamodule, "check_world_size"):
            self.datamodule.check_world_size(world)
        for callback in self.trainer.callbacks:
            if hasattr(callback, "check_config"):
                callback.check_config(self.trainer, self.model)
        self._check_data_shape()
        if self.subcommand == "fit":
            self._check_learning_rate(config.model.as_dict())
            self._check_checkpoint_folder(config)

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

    def _take_run_folder(self) -> None:
        """Lock the run folder (one fit at a time), then tidy it: corrupt files aside, temp files gone."""
        if self.run_dir is None or not _is_first_process():
            return
        lock = RunFolderLock(self.run_dir)
        try:
            lock.acquire()
        except RunFolderLocked as error:
            self._fail(error)
        _LOCKS.append(lock)
        ckpt_dir = (self.run_dir / "checkpoints").resolve()
        for path in self._corrupt:
            if path.exists() and path.resolve().parent == ckpt_dir:
                print(f"train.py: moved the corrupt checkpoint {path} aside to {quarantine(path)}", file=sys.stderr)
        for path in remove_orphan_temp_files(ckpt_dir):
            print(f"train.py: removed {path}, left by an interrupted checkpoint write", file=sys.stderr)

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
    def _at_checkpoint_step(self) -> None:
        """Evaluate at the checkpoint's step: ``trainer.global_step`` (which names every
        evaluation output and logged point) is otherwise 0 outside ``fit``."""
        if self.checkpoint_step is None:
            return
        loop = self.trainer.fit_loop.epoch_loop
        loop.automatic_optimization.optim_progress.optimizer.step.total.completed = self.checkpoint_step
        loop.manual_optimization.optim_step_progress.total.completed = self.checkpoint_step
        loop._batches_that_stepped = self.checkpoint_step

    before_validate = before_test = before_predict = _at_checkpoint_step

    def after_fit(self) -> None:
        """A run stopped by ``max_consecutive_skips`` fails, so a scheduler does not read it as done."""
        reason = getattr(self.model, "fault_stop", None)
        if reason:
            print(f"train.py: error: {reason}", file=sys.stderr)
            raise SystemExit(FAULT_EXIT)


def build_cli(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DifftimeCLI:
    """The command (``args`` as on the command line, or a config dict) as :func:`main` runs it, but a
    refused command line raises :class:`CliFailed` instead of exiting."""
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
        )
    finally:
        while _LOCKS:
            _LOCKS.pop().release()
        if _is_first_process():
            os.environ.pop(_STAMP_ENV, None)  # the next in-process invocation gets its own time


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DifftimeCLI:
    """``train.py`` in-process: a refused command line is one line ``train.py: error: ...`` on stderr
    and ``SystemExit(2)``, before any work."""
    try:
        return build_cli(args, run)
    except CliFailed as failure:
        print(f"train.py: error: {failure}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main() -> None:
    """``python train.py ...`` and the ``difftime-train`` console entry point."""
    from configs import resolve_config_args

    try:
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
        main()
    except Preempted as stop:
        print(f"train.py: {stop}; exiting cleanly", file=sys.stderr)
        raise SystemExit(0)
