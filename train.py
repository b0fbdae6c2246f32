"""difftime command line: ``python train.py {fit,validate,test,predict} --config ...``.

A LightningCLI: every module, datamodule, callback, SDE, network, loss and sampler is injected
by ``class_path``/``init_args`` from layered YAML (``--config base.yaml --config exp.yaml``).

What this entry point adds to LightningCLI:

* Values out of range fail before any process group starts or device memory is allocated, with
  the full config key in the message (``config key 'model.init_args.sde.init_args.T' ...``).
* A stable run directory ``<save_dir>/<name>/<version>``: a requeued job (same command) resumes
  automatically from the newest valid checkpoint there; ``--ckpt_path last`` does the same and,
  with an auto-numbered logger version, continues the latest existing version instead of
  silently starting a new one from scratch. Corrupted checkpoints are skipped with a warning.
* TensorBoard continues the same run after a resume: events after the checkpoint's step are
  purged (``purge_step``), so no step is shown twice.
* Checkpoints are written atomically and verified before loading (SafeCheckpointIO); SLURM
  preemption is handled by the Preemption callback at a step boundary (Lightning's own SLURM
  handler, which checkpoints inside the signal handler, is disabled).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks.checkpoint_io import SafeCheckpointIO
from difftime.checkpoints import CorruptCheckpointError, checkpoint_step, find_resume_checkpoint, verify_checkpoint
from callbacks.preemption import Preempted, Preemption
from difftime.utils import ConfigError


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


def _latest_version(root: Path) -> str | None:
    versions = [(int(m.group(1)), p.name) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions)[1] if versions else None


class DifftimeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")

    # ------------------------------------------------------------------ run directory and resume
    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        config = self.config[self.subcommand]
        run_dir = self._pin_run_dir(config)
        if run_dir is not None:
            self._resolve_resume(config, run_dir / "checkpoints")

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

    def _resolve_resume(self, config: Any, ckpt_dir: Path) -> None:
        requested = config.get("ckpt_path")
        if requested not in (None, "last"):
            path = Path(requested)
            try:
                verify_checkpoint(path)
            except CorruptCheckpointError as error:
                fallback = find_resume_checkpoint(path.parent)
                if fallback is None:
                    raise
                warnings.warn(f"{error}; falling back to the newest valid checkpoint {fallback}", stacklevel=2)
                config.ckpt_path = str(fallback)
            self._purge_after(config, Path(config.ckpt_path))
            return
        found = find_resume_checkpoint(ckpt_dir)
        if found is None:
            config.ckpt_path = None
            return
        print(f"train.py: resuming from {found} (newest valid checkpoint of this run; choose another "
              "--trainer.logger.init_args.version to start a new run)", file=sys.stderr)
        config.ckpt_path = str(found)
        self._purge_after(config, found)

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

    # ------------------------------------------------------------------ instantiation
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as raised:
            error = _config_error(raised)
            if error is None:
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            key = _find_key(config.as_dict(), error)
            message = error.with_prefix(key[: -len(error.key)]) if key else error
            print(f"train.py: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    def instantiate_trainer(self, **kwargs: Any):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, SafeCheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))  # Preemption does it at a step boundary
        return super().instantiate_trainer(plugins=plugins, **kwargs)


def main(args: list[str] | None = None, run: bool = True) -> DifftimeCLI:
    return DifftimeCLI(
        args=args,
        run=run,
        trainer_defaults={"use_distributed_sampler": False, "callbacks": [Preemption()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def cli_main() -> None:
    """``python train.py ...`` and the ``difftime-train`` console entry point."""
    from configs import resolve_config_args

    try:
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
        main()
    except Preempted as stop:
        print(f"train.py: {stop}; exiting cleanly", file=sys.stderr)
        raise SystemExit(0)


if __name__ == "__main__":
    cli_main()
