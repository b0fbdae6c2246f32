"""The shipped LightningCLI configs, read from the installed ``configs`` data package.

``python train.py fit --config configs/quickstart.yaml`` reads the file from the working tree.
The console entry points (``difftime-train``, ``difftime-sample``, ``difftime-study``) also accept
these names after a non-editable install, outside the source tree: a ``--config`` value that
names no file on disk but names a shipped config (``configs/quickstart.yaml``,
``quickstart.yaml``, ``T/0.4.yaml``) is read from the installed copy, and the entry point says so.
``configs`` holds only YAML; it is located with :func:`importlib.resources.files`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["configs_root", "resolve_config_args", "shipped"]


def configs_root() -> Path:
    """The folder of the installed ``configs`` package (the working tree's in an editable install)."""
    return Path(str(resources.files("configs"))).resolve()


def shipped(name: str | Path) -> Path | None:
    """The installed copy of a shipped config named ``name``, or None when there is none."""
    root = configs_root()
    parts = Path(name).parts
    relative = Path(*parts[1:]) if parts and parts[0] == "configs" else Path(name)
    candidate = (root / relative).resolve()
    if root in candidate.parents and candidate.suffix == ".yaml" and candidate.is_file():
        return candidate
    return None


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config X`` that is not a file replaced by the shipped copy of X."""
    resolved, expect = [], False
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (arg if expect else None)
        if value is not None and not Path(value).exists() and (found := shipped(value)) is not None:
            print(f"difftime: --config {value}: using the shipped config {found}")
            arg = f"--config={found}" if arg.startswith("--config=") else str(found)
        resolved.append(arg)
        expect = arg == "--config"
    return resolved
