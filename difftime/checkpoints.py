"""Checkpoint I/O of the whole project: atomic writes, verification, weights-only loads.

Used by train.py, sample.py, the Lightning systems, the callbacks and the auxiliary-prior
loader alike (pure torch: the Lightning CheckpointIO plugin in :mod:`callbacks.checkpoint_io`
only delegates here).

* Writes go to a temporary file in the target directory, are fsync'ed and then renamed with
  ``os.replace`` (atomic on POSIX within one filesystem), and the directory entry is fsync'ed.
  Lightning's default stages the file elsewhere and moves it across filesystems, which is not
  atomic.
* ``torch.load`` does not check the CRC-32 that the zip container stores for every member, so a
  flipped byte can load silently. :func:`verify_checkpoint` reads every member and checks its CRC
  (and the zip structure, which catches truncation) before anything is loaded.
* Every load uses ``weights_only=True``: checkpoints hold tensors and plain types only.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file failed verification; the message names the file."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` unless every zip member's CRC checks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupted or truncated ({error})") from error
    except Exception as error:  # zlib errors, struct errors on damaged headers
        raise CorruptCheckpointError(f"checkpoint {path} is corrupted ({type(error).__name__}: {error})") from error
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupted: CRC mismatch in member '{bad}'")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same directory, fsync, os.replace, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_verified(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify, then ``torch.load(..., weights_only=True)``; errors name the file."""
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CorruptCheckpointError(f"checkpoint {path} could not be loaded with weights_only=True: {error}") from error


_STEP = re.compile(r"step=(\d+)")


def checkpoint_step(path: Path) -> int:
    """Global step stored in a checkpoint (read without materialising its tensors)."""
    match = _STEP.search(path.name)
    if match and path.name != "last.ckpt":
        return int(match.group(1))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", -1))


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """Newest valid checkpoint in ``directory`` by global step (never an older one by mtime).

    Corrupted or truncated files are skipped with a warning that names them; ``None`` only
    when no valid checkpoint exists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates: list[tuple[int, int, Path]] = []
    for path in directory.glob("*.ckpt"):
        try:
            verify_checkpoint(path)
            step = checkpoint_step(path)
        except (CorruptCheckpointError, RuntimeError, OSError, EOFError) as error:
            warnings.warn(f"skipping unusable checkpoint {path}: {error}", stacklevel=2)
            continue
        candidates.append((step, int(path.name != "last.ckpt"), path))
    if not candidates:
        return None
    return max(candidates)[2]
