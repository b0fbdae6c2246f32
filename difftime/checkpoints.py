"""Checkpoint I/O of the whole project: atomic writes, verification, weights-only loads.

Used by train.py, sample.py, the Lightning systems, the callbacks and the auxiliary-prior
loader alike (pure torch: the Lightning CheckpointIO plugin in :mod:`commands.checkpoint_io`
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
import secrets
import warnings
import zipfile
from dataclasses import dataclass, field
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


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside ``path`` (matching ``_TEMP_GLOB``), opened for writing.

    Created with mode 0666 filtered by the umask, as ``open`` creates files: umask 022 gives
    0644, 027 gives 0640 (group members can read a colleague's checkpoints). ``tempfile.mkstemp``
    would create it 0600 whatever the umask, and ``os.replace`` keeps that mode.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), tmp
        except FileExistsError:
            continue


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same directory, fsync, os.replace, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
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


def load_verified(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Verify, then ``torch.load(..., weights_only=True)``; errors name the file.

    ``mmap=True`` maps the tensors instead of reading them (cheap when only metadata is needed).
    """
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:
        raise CorruptCheckpointError(f"checkpoint {path} could not be loaded with weights_only=True: {error}") from error


_STEP = re.compile(r"step=(\d+)")
_TEMP_GLOB = ".*.tmp"  # the names atomic_torch_save stages under


def checkpoint_step(path: Path) -> int:
    """Global step stored in a checkpoint (read without materialising its tensors)."""
    match = _STEP.search(path.name)
    if match and path.name != "last.ckpt":
        return int(match.group(1))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", -1))


def check_loadable(path: str | os.PathLike) -> int:
    """Verify the CRCs *and* that ``weights_only`` accepts the pickle; return the global step.

    A valid zip whose pickle names a class outside the weights-only allowlist would pass the CRC
    check and then abort the resume at load time, so it counts as corrupt here.
    """
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError from torch's reader
        raise CorruptCheckpointError(f"checkpoint {path} is refused by weights_only loading ({error})") from error
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint {path} does not hold a checkpoint dictionary")
    return int(state.get("global_step", -1))


@dataclass
class CheckpointScan:
    """What a checkpoint folder holds: the chosen checkpoint and the invalid files seen before it."""

    chosen: Path | None = None
    step: int = -1
    invalid: list[tuple[Path, str]] = field(default_factory=list)
    candidates: int = 0


def _claimed_step(path: Path) -> int | str:
    """The step a file claims (by name, else from its pickle header), or why it is unreadable."""
    try:
        return checkpoint_step(path)
    except Exception as error:  # truncated zip, refused pickle: no need to read the rest
        return f"checkpoint {path} is unreadable ({type(error).__name__}: {error})"


def scan_checkpoints(directory: str | os.PathLike, below: int | None = None,
                     exclude: tuple[Path, ...] = ()) -> CheckpointScan:
    """Newest checkpoint of ``directory`` that passes :func:`check_loadable`, by global step.

    Files are tried newest first (by the step they claim; ``last.ckpt`` loses ties to the named
    file of the same step) and only until one passes, so a folder of large checkpoints is not
    read in full. ``below`` keeps only steps smaller than it (the fallback for an explicit
    corrupt ``--ckpt_path``: the checkpoint before it, never a newer one).
    """
    directory, scan = Path(directory), CheckpointScan()
    if not directory.is_dir():
        return scan
    paths = [p for p in directory.glob("*.ckpt") if p.is_file() and p not in exclude]
    claims = {p: _claimed_step(p) for p in paths}
    scan.invalid += [(p, claim) for p, claim in claims.items() if isinstance(claim, str)]
    order = sorted(((c, int(p.name != "last.ckpt"), p) for p, c in claims.items() if isinstance(c, int)), reverse=True)
    for claimed, _, path in order:
        if below is not None and claimed >= below:
            continue
        scan.candidates += 1
        try:
            step = check_loadable(path)
        except (CorruptCheckpointError, OSError, EOFError) as error:
            scan.invalid.append((path, str(error)))
            continue
        if below is None or step < below:
            scan.chosen, scan.step = path, step
            return scan
    return scan


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """Newest valid checkpoint in ``directory`` by global step (never an older one by mtime).

    Corrupted, truncated or weights-only-refused files are skipped with a warning that names
    them; ``None`` only when no valid checkpoint exists.
    """
    scan = scan_checkpoints(directory)
    for path, reason in scan.invalid:
        warnings.warn(f"skipping unusable checkpoint {path}: {reason}", stacklevel=2)
    return scan.chosen


def quarantine(path: str | os.PathLike) -> Path:
    """Move a corrupt checkpoint aside to ``<name>.corrupt`` (``.corrupt.1``, ... if taken).

    Left in place, a corrupt ``last.ckpt`` makes Lightning write ``last-v1.ckpt`` next to it and
    every later ``--ckpt_path .../last.ckpt`` hits the damaged file again.
    """
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, target)
    return target


def remove_orphan_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left by writes killed mid-way (each as large as a checkpoint).

    Only call this while holding the run folder's lock: a live writer's temp file looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.glob(_TEMP_GLOB) if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
