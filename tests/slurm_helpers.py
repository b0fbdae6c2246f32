"""Talking to a real SLURM cluster from the tests (``scripts/local_slurm.sh start`` runs one on this
machine): is it usable, submit, read a job's record, wait. Standard library only: conftest imports it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "sudo bash scripts/local_slurm.sh start"


@lru_cache(maxsize=1)
def cluster_problem() -> str | None:
    """Why the tests marked ``slurm`` cannot run here, or None when a node takes jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"SLURM is not installed (no sinfo/sbatch on PATH); as root: {START}"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        who = "" if os.geteuid() == 0 else " (needs root)"
        said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
        return f"no SLURM controller answers (scontrol ping: {said}); start one{who}: {START}"
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout.split()
    if not any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc") for s in states):
        return f"no SLURM node takes jobs (node states: {' '.join(states) or 'none'}); {START}"
    return None


#: what an in-process DDP test leaves in os.environ: a job that inherited MASTER_PORT would bind the
#: same port as every other job submitted from this process (EADDRINUSE when two run side by side),
#: instead of the port Lightning derives from its SLURM job id
DISTRIBUTED_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch passes to the jobs: a submitter's shell (no torch.distributed variables
    left by earlier tests), one thread (bit-identical runs, a shared machine), this interpreter's
    virtual environment, the test callbacks importable."""
    clean = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_KEYS}
    return {**clean, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VENV": os.path.realpath(sys.prefix),
            "PYTHON": sys.executable, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **extra}


def sbatch(args: list[str], env: dict[str, str], umask: int = 0o022) -> str:
    """Submit from the repository root (the templates ``cd`` there); returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, f"sbatch {' '.join(args)} failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o``: one record per job (per array task), KEY=VALUE fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    records = []
    for line in out.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        if fields:
            records.append(fields)
    return records


def job(job_id: str) -> dict[str, str]:
    """The record of a single job (or of one array task, ``<array job>_<task>``)."""
    records = job_records(job_id)
    assert len(records) == 1, f"scontrol show job {job_id}: {len(records)} records"
    return records[0]


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


def finished(record: dict[str, str]) -> bool:
    return record.get("JobState") in FINISHED


def wait_until(check: Callable[[], object], timeout: float, what: str, poll: float = 0.5) -> object:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_finished(job_id: str, timeout: float) -> list[dict[str, str]]:
    """Every record of ``job_id`` once all of them have finished (an array: all its tasks)."""
    def done() -> list[dict[str, str]] | None:
        records = job_records(job_id)
        return records if records and all(finished(r) for r in records) else None

    return wait_until(done, timeout, f"SLURM job {job_id} to finish")  # type: ignore[return-value]
