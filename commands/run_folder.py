"""The run folder of ``train.py``: ``<save_dir>/<name>/<version>``, pinned, locked and resumed.

* The version is pinned: a requeued SLURM job uses ``slurm-<job id>``; ``--ckpt_path last`` with an
  auto-numbered logger continues the latest ``version_N`` instead of starting an empty one.
* A ``fit`` into a folder that already holds a run resumes from its newest valid checkpoint and
  says so after Lightning's banner, naming the run and the step (a run already at ``max_steps``
  has nothing left to train). Corrupt checkpoints are moved aside to ``<name>.corrupt``; an
  explicit corrupt ``--ckpt_path`` falls back to the newest valid one before it; a folder of
  invalid checkpoints only restarts with ``--fresh_start true``. Orphan temp files are removed.
* One ``fit`` at a time holds the folder (:class:`commands.run_lock.RunFolderLock`).
* ``--ckpt_path`` is verified and compared with the command line
  (:func:`commands.runs.checkpoint_conflicts`); problems are reported after the config's own checks.
* The training config is written once (``config.yaml``); a resumed ``fit`` and every evaluation write
  ``config-<subcommand>-<time>.yaml`` and evaluations log into ``<run>/<subcommand>-<time>/``.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import SaveConfigCallback

from commands.config_errors import CliError, CliFailed
from commands.run_lock import RunFolderLock, RunFolderLocked
from commands.runs import RunError, checkpoint_conflicts, load_checkpoint
from difftime.checkpoints import (CorruptCheckpointError, check_loadable, checkpoint_step, quarantine,
                                  remove_orphan_temp_files, scan_checkpoints)

PROG = "train.py"
LOCKS: list[RunFolderLock] = []  # released by commands.cli.build_cli, also when it raises
STAMP_ENV = "DIFFTIME_RUN_STAMP"  # inherited by DDP worker processes: one name for all ranks
NEW_RUN = "--trainer.logger.init_args.version NAME"


def _latest_version(root: Path) -> str | None:
    versions = [(int(m.group(1)), p.name) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions)[1] if versions else None


def stamp() -> str:
    """Time stamp naming this invocation's config and evaluation folder (shared by all ranks)."""
    return os.environ.setdefault(STAMP_ENV, time.strftime("%Y%m%d-%H%M%S"))


def is_first_process() -> bool:
    """Rank 0 of the job (DDP workers and other SLURM tasks do not take the run lock)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@dataclass
class Resume:
    """A ``fit`` that continues a run: from ``checkpoint`` at global ``step``; ``automatic``: chosen
    because the run folder already held a run (not asked for with ``--ckpt_path``)."""

    run_dir: Path | None
    checkpoint: Path
    step: int
    automatic: bool

    def notice(self, max_steps: int) -> str:
        """The framed lines ``fit`` prints before training (stderr)."""
        where = f"the run in {self.run_dir}" if self.run_dir else "the run"
        if max_steps is not None and 0 <= max_steps <= self.step:
            head = (f"NOTHING LEFT TO TRAIN: {where} is already at step {self.step}, max_steps = {max_steps} "
                    f"(resuming from {self.checkpoint} stops at once); raise --trainer.max_steps to train on")
        else:
            until = f" of max_steps = {max_steps}" if max_steps is not None and max_steps > 0 else ""
            head = f"RESUMING {where} at step {self.step}{until} (resuming from {self.checkpoint})"
        why = ("this folder already holds a run; for a new run pass " + NEW_RUN + " or another save_dir/name") \
            if self.automatic else "as asked by --ckpt_path"
        rule = f"{PROG}: " + "=" * 72
        return "\n".join([rule, f"{PROG}: {head}", f"{PROG}: ({why})", rule])


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
        base, n = f"config-{stage}-{stamp()}", 0
        path = run_dir / f"{base}.yaml"
        while path.exists():
            n += 1
            path = run_dir / f"{base}-{n}.yaml"
        return path


class RunFolder:
    """The run-folder part of :class:`commands.cli.DifftimeCLI` (a LightningCLI mixin)."""

    run_dir: Path | None = None
    resumed: Resume | None = None
    checkpoint_step: int | None = None  # global step of the --ckpt_path checkpoint
    checkpoint_record: dict[str, Any] | None = None  # its "difftime" entry (SDE, data shape)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's: verify, compare, import nothing, overwrite nothing.

        Runs before the classes are instantiated: the resume checkpoint of ``fit`` is chosen
        here, and the chosen file is verified and compared with the command line. A problem
        found here is reported only after the config's own checks passed (:meth:`raise_deferred`),
        so an invalid value is never reported as a checkpoint mismatch.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        self._corrupt: list[Path] = []
        self._deferred: BaseException | None = None
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
            self._deferred = error  # reported after the config's own checks (raise_deferred)

    @staticmethod
    def _fail(error: BaseException | str) -> NoReturn:
        raise CliFailed(str(error)) from None

    def raise_deferred(self) -> None:
        """Refuse the command line for the checkpoint problem :meth:`_parse_ckpt_path` found, if any."""
        if getattr(self, "_deferred", None) is not None:
            self._fail(self._deferred)

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
            logger.init_args.sub_dir = f"{subcommand}-{stamp()}"

    def _resolve_resume(self, config: Any) -> None:
        requested = config.get("ckpt_path")
        if requested not in (None, "last"):
            config.ckpt_path = str(self._explicit_fit_checkpoint(Path(requested)))
            self.resumed = Resume(self.run_dir, Path(config.ckpt_path), checkpoint_step(Path(config.ckpt_path)), False)
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
        self.resumed = Resume(self.run_dir, scan.chosen, scan.step, automatic=True)
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

    def _take_run_folder(self) -> None:
        """Lock the run folder (one fit at a time), then tidy it: corrupt files aside, temp files gone."""
        if self.run_dir is None or not is_first_process():
            return
        lock = RunFolderLock(self.run_dir)
        try:
            lock.acquire()
        except RunFolderLocked as error:
            self._fail(error)
        LOCKS.append(lock)
        ckpt_dir = (self.run_dir / "checkpoints").resolve()
        for path in self._corrupt:
            if path.exists() and path.resolve().parent == ckpt_dir:
                print(f"{PROG}: moved the corrupt checkpoint {path} aside to {quarantine(path)}", file=sys.stderr)
        for path in remove_orphan_temp_files(ckpt_dir):
            print(f"{PROG}: removed {path}, left by an interrupted checkpoint write", file=sys.stderr)

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

    def before_fit(self) -> None:
        """Say that this fit continues a run, after Lightning's banner where it cannot be missed."""
        if self.resumed is not None and is_first_process():
            print(self.resumed.notice(getattr(self.trainer, "max_steps", -1)), file=sys.stderr)
