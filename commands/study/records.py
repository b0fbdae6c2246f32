"""A unit is done only when its outputs verify.

When a unit finishes, each of its output files is recorded with its SHA-256 in ``done.json``;
:func:`status` re-verifies the record every time, so a deleted ``samples.npz`` or a garbled
``result.json`` makes the unit run again (and the study says which file). Fit units that finished
before records existed count as done when their final checkpoint is valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from commands.study.config import FIT_KINDS
from commands.study.plan import Unit

RECORD = "done.json"
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a study re-reads nothing unchanged


def atomic_json(path: Path, value: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def sha256(path: Path) -> str:
    """SHA-256 of a file, cached by path, size and modification time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def recorded_files(folder: Path) -> dict[str, str]:
    """The files a unit's record lists, with their SHA-256 ({} without a readable record)."""
    try:
        files = json.loads((folder / RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return dict(files) if isinstance(files, dict) else {}


def write_record(unit: Unit, files: list[Path]) -> None:
    """Record the unit's output files (paths relative to its folder) with their SHA-256, and the
    records of the units it read (``inputs``): it is done."""
    record = {"unit": unit.id, "finished": time.time(),
              "files": {p.relative_to(unit.folder).as_posix(): sha256(p) for p in files},
              "inputs": {dep: recorded_files(unit.root / "units" / dep) for dep in unit.deps}}
    atomic_json(unit.folder / RECORD, record)


def record_problem(unit: Unit) -> str | None:
    """None when the unit's record verifies, else what is wrong, naming the file."""
    path = unit.folder / RECORD
    if not path.is_file():
        return "no record of its outputs" if (unit.folder / "result.json").exists() else "not finished"
    try:
        record = json.loads(path.read_text())
        items, inputs = list(record["files"].items()), dict(record.get("inputs") or {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{RECORD} is unreadable"
    for name, digest in items:
        target = unit.folder / name
        if not target.is_file():
            return f"{name} is missing"
        if sha256(target) != digest:
            return f"{name} differs from what the unit wrote (SHA-256 {sha256(target)[:12]}, recorded {str(digest)[:12]})"
    for dep, files in inputs.items():
        if recorded_files(unit.root / "units" / dep) != files:
            return f"{dep}, which it read, has changed since it ran"
    return None


def set_aside_unverified(unit: Unit) -> list[str]:
    """Move every recorded file of ``unit`` that no longer verifies to ``<name>.invalid``, and drop
    the record: a fit then resumes from its newest checkpoint that still does, and train.py writes
    a fresh ``config.yaml``. Returns the names moved aside."""
    path, files, moved = unit.folder / RECORD, recorded_files(unit.folder), []
    for name, digest in files.items():
        target = unit.folder / name
        if target.is_file() and sha256(target) != digest:
            target.replace(target.with_name(target.name + ".invalid"))
            moved.append(name)
    path.unlink(missing_ok=True)
    return moved


def final_checkpoint(unit: Unit) -> Path | None:
    """The newest valid checkpoint of a fit unit if it holds the final step, else None."""
    from difftime.checkpoints import checkpoint_step, scan_checkpoints

    chosen = scan_checkpoints(unit.folder / "checkpoints").chosen
    if chosen is None:
        return None
    return chosen if checkpoint_step(chosen) >= unit.params["trainer"]["max_steps"] else None


def done_steps(unit: Unit) -> int:
    """The global step of a fit unit's newest valid checkpoint (0 without one)."""
    from difftime.checkpoints import checkpoint_step, scan_checkpoints

    chosen = scan_checkpoints(unit.folder / "checkpoints").chosen
    return checkpoint_step(chosen) if chosen is not None else 0


def status(unit: Unit) -> str:
    """'done', 'invalid' (recorded outputs that do not verify: it runs again), 'partial' (started; a
    fit resumes from its checkpoint) or 'to do'. The report is always rebuilt."""
    if unit.kind == "report":
        return "to do"
    if (unit.folder / RECORD).is_file() or (unit.kind not in FIT_KINDS and (unit.folder / "result.json").exists()):
        return "done" if record_problem(unit) is None else "invalid"
    if unit.kind in FIT_KINDS:
        if final_checkpoint(unit) is not None:
            return "done"
        folder = unit.folder / "checkpoints"
        return "partial" if folder.is_dir() and any(folder.glob("*.ckpt")) else "to do"
    return "partial" if unit.folder.is_dir() else "to do"


class OutputError(RuntimeError):
    """A finished unit's output that cannot be read: one line naming the unit and the file."""


def read_result(unit: Unit, name: str = "result.json") -> dict[str, Any]:
    """A unit's JSON output; an unreadable one is an OutputError naming the unit and the file."""
    path = unit.folder / name
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise OutputError(f"unit {unit.id}: cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise OutputError(f"unit {unit.id}: {path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise OutputError(f"unit {unit.id}: {path} holds a {type(value).__name__}, not a JSON object")
    return value


def load_samples(unit: Unit) -> Any:
    """The samples of a sample unit (``samples/samples.npz``) as a tensor; errors name the unit and file."""
    import numpy as np
    import torch

    path = unit.folder / "samples" / "samples.npz"
    try:
        with np.load(path) as archive:
            return torch.from_numpy(archive["samples"])
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise OutputError(f"unit {unit.id}: cannot read {path} ({type(error).__name__}: {error})") from None
