"""The run folder's lock: one ``fit`` at a time on ``<save_dir>/<name>/<version>``.

Two ``fit``s on one folder would interleave their checkpoints and configs. Only the command line
takes this lock (:meth:`commands.cli.DifftimeCLI._take_run_folder`), so it lives here and not in the
core's checkpoint I/O.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolderLock:
    """Exclusive lock on a run folder: ``<run>/.lock`` holding ``pid``, ``host`` and SLURM job id.

    Two ``fit``s on one folder would interleave their checkpoints and configs. The file is
    created with ``O_EXCL`` (atomic). A lock is stale, and is taken over, when it was written on
    this host by a process that no longer exists, by this very process, or by the same SLURM job
    (a requeued job keeps its id and cannot run twice); a lock of a live process, or of another
    host outside that job, is refused with both owners named.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    @staticmethod
    def _owner() -> dict[str, str]:
        return {"pid": str(os.getpid()), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}

    def _read(self) -> dict[str, str]:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return {}
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def _stale(self, owner: dict[str, str]) -> bool:
        me = self._owner()
        if owner.get("slurm_job") and owner.get("slurm_job") == me["slurm_job"]:
            return True
        if owner.get("host") != me["host"]:
            return False
        pid = owner.get("pid", "")
        return not pid.isdigit() or pid == me["pid"] or not _pid_alive(int(pid))

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; raise :class:`RunFolderLocked` otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k}={v}\n" for k, v in self._owner().items())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if not self._stale(owner):
                    raise RunFolderLocked(
                        f"run folder {self.path.parent} is in use by pid {owner.get('pid', '?')} on host "
                        f"{owner.get('host', '?')} (lock file {self.path}); wait for that run to end, choose "
                        "another --trainer.logger.init_args.version, or delete the lock file if that process "
                        "is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            self.held = True
            return
        raise RunFolderLocked(f"could not take the lock {self.path}: it keeps being re-created")

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        if self.held and self._read().get("pid") == str(os.getpid()):
            self.path.unlink(missing_ok=True)
        self.held = False
