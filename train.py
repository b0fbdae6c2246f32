"""difftime command line: ``python train.py {fit,validate,test,predict} --config ...``.

A LightningCLI: every module, datamodule, callback, SDE, network, loss and sampler is injected
by ``class_path``/``init_args`` from layered YAML (``--config base.yaml --config exp.yaml``).
Values out of range fail before any process group starts or device memory is allocated, with
the full config key in the message.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffusion.utils import ConfigError


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


class DifftimeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ConfigError as error:
            config = self.config[self.subcommand] if self.subcommand else self.config
            key = _find_key(config.as_dict(), error)
            message = error.with_prefix(key[: -len(error.key)]) if key else error
            print(f"train.py: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None


def main(args: list[str] | None = None, run: bool = True) -> DifftimeCLI:
    return DifftimeCLI(
        args=args,
        run=run,
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
