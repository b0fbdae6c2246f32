"""The study's command line: ``study.py`` / ``difftime-study`` / ``python -m commands.study``.

    difftime-study --config configs/study/digits_cpu.yaml [--dry-run] [--executor local|slurm] [--stage ...]

The spec is read relative to the working directory (else the shipped copy of that name), and so
are its ``out`` folder and the configs it names. Everything it will use is checked first
(:mod:`commands.study.check`); a bad value is one line naming its spec key, exit status 2.
``--dry-run`` prints the plan: each unit's status, its estimated cost with the source of the
rate (:mod:`commands.study.estimates`) and the exact commands a run would execute.
"""

from __future__ import annotations

import argparse
import sys

from commands.study.check import check_device, check_fit_configs, load_spec
from commands.study.estimates import Rates, estimate
from commands.study.executors import announce, command, run_local, run_task, submit_slurm, task_unit, write_task_list
from commands.study.plan import STAGES, Plan, Unit, make_plan
from commands.study.records import OutputError, record_problem, status
from commands.study.spec import SpecError
from commands.study.units import Requeued, UnitError, run_unit

PROG = "study.py"


def print_plan(plan: Plan, stages: tuple[str, ...]) -> list[Unit]:
    """The plan table, the estimates with their sources and the commands a run would execute;
    returns the units it would run."""
    todo, invalid, total, rates = [], [], 0.0, Rates(plan)
    print(f"study {plan.spec.name}: {len(plan.units)} units in {plan.out}")
    print(f"{'stage':<9} {'status':<8} {'est. s':>8}  unit")
    for stage in stages:
        for unit in plan.stage(stage):
            state = status(unit)
            cost = estimate(unit, rates, plan.spec, state)
            total += cost
            print(f"{stage:<9} {state:<8} {cost:>8.0f}  {unit.id}")
            if state != "done":
                todo.append(unit)
            if state == "invalid":
                invalid.append(f"  {unit.id}: {record_problem(unit)}")
    print(f"estimated: {total / 60:.1f} min for {len(todo)} units to run (estimates from these rates:)")
    print("\n".join(rates.lines()))
    if invalid:
        print("runs again, its recorded outputs do not verify:")
        print("\n".join(invalid))
    print("would execute:")
    for unit in todo:
        print("  " + " ".join(command(plan, unit)))
    return todo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study spec (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what a run would execute")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all")
    parser.add_argument("--run-unit", default=None, help="run one unit by id (what a worker does)")
    parser.add_argument("--task-list", choices=STAGES, default=None, help="SLURM: pin a stage's to-do units, print their count")
    parser.add_argument("--task", nargs=2, metavar=("STAGE", "INDEX"), default=None, help="SLURM: run one array task")
    parser.add_argument("--task-unit", nargs=2, metavar=("STAGE", "INDEX"), default=None,
                        help="SLURM: print the unit id an array task runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Plan:
    """Check the spec, plan, then do what the arguments ask; returns the plan."""
    args = parse_args(argv)
    submits = args.executor == "slurm" and not (args.run_unit or args.task)
    spec = load_spec(args.config, "slurm" if submits or args.task_list else "local")
    plan = make_plan(spec, args.config)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.run_unit:
        if args.run_unit not in plan.units:
            raise SpecError("--run-unit", f"no unit {args.run_unit} in this study")
        unit = plan.units[args.run_unit]
        announce(unit, status(unit))
        run_unit(plan, unit)
    elif args.task_list:
        print(write_task_list(plan, args.task_list))
    elif args.task_unit:
        print(task_unit(plan, args.task_unit[0], int(args.task_unit[1])))
    elif args.task:
        run_task(plan, args.task[0], int(args.task[1]))
    else:
        check_fit_configs(plan)
        if args.dry_run:
            print_plan(plan, stages)
        elif submits:
            submit_slurm(plan)
        else:
            run_local(plan, stages)
    return plan


def cli_main() -> None:
    """The console entry point: a bad spec is one line and exit status 2, a unit that fails one line and 1,
    a fit preempted and requeued under SLURM one line and 0."""
    try:
        main()
    except SpecError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Requeued:
        raise SystemExit(0) from None  # said on stderr already; SLURM restarts the task
    except (UnitError, OutputError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["PROG", "check_device", "cli_main", "main", "parse_args", "print_plan"]
