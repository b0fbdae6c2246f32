"""Executors: ``local`` runs the units one after the other in this process (fits as ``train.py fit``
subprocesses); ``slurm`` submits one array job per stage chained with ``--dependency=afterok``,
the report last (``slurm_study.sh``, shipped beside this module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from commands.study.plan import Plan, Unit
from commands.study.records import record_problem, status
from commands.study.units import UnitError, fit_command, run_unit, say, subprocess_env

SLURM_SCRIPT = Path(__file__).resolve().parent / "slurm_study.sh"


def command(plan: Plan, unit: Unit) -> list[str]:
    """The exact command that runs ``unit`` (the local executor runs evaluations in-process, the same code)."""
    if unit.kind in ("score", "aux"):
        return fit_command(unit)
    return [sys.executable, "-m", "commands.study", "--config", str(plan.spec_path), "--run-unit", unit.id]


def announce(unit: Unit, state: str) -> None:
    """One line on stderr: the unit that runs now, and why again when its recorded outputs do not verify."""
    why = f" ({record_problem(unit)}; running it again)" if state == "invalid" else ""
    say(f"running {unit.id}{why}")


def run_local(plan: Plan, stages: tuple[str, ...]) -> None:
    """Run every unit that is not done, stage by stage, one after the other."""
    for stage in stages:
        for unit in plan.stage(stage):
            state = status(unit)
            if state != "done":
                announce(unit, state)
                run_unit(plan, unit)


def write_task_list(plan: Plan, stage: str) -> int:
    """Pin the to-do units of ``stage`` for a SLURM array (index -> unit id); returns their count."""
    todo = [u.id for u in plan.stage(stage) if status(u) != "done"]
    folder = plan.out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.units").write_text("".join(f"{u}\n" for u in todo))
    return len(todo)


def task_unit(plan: Plan, stage: str, index: int) -> str:
    """The id of the unit pinned to array index ``index`` of ``stage`` (:func:`write_task_list`)."""
    return (plan.out / "slurm" / f"{stage}.units").read_text().split()[index]


def run_task(plan: Plan, stage: str, index: int) -> None:
    """One SLURM array task: the ``index``-th pinned unit of ``stage``, unless it is done by now."""
    unit = plan.units[task_unit(plan, stage, index)]
    state = status(unit)
    if state != "done":
        announce(unit, state)
        run_unit(plan, unit)


def submit_slurm(plan: Plan) -> None:
    """Submit the study to SLURM with this interpreter (``PYTHON``) from the working directory."""
    if not SLURM_SCRIPT.is_file():
        raise UnitError(f"the SLURM script {SLURM_SCRIPT} is missing from this installation (package data of "
                        "commands.study)")
    env = {**subprocess_env(), "PYTHON": os.environ.get("PYTHON", sys.executable)}
    subprocess.run(["bash", str(SLURM_SCRIPT), str(plan.spec_path)], check=True, env=env)
