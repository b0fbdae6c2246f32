"""Running one unit: a fit (``train.py fit`` in a subprocess), the digit classifier, a bits/dim
evaluation or a sample run (functions of :mod:`commands.runs` and :mod:`commands.sampling`, called
in this process with typed arguments). Each unit ends by recording its outputs
(:func:`~commands.study.records.write_record`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from commands.study.config import build_object
from commands.study.plan import Plan, Unit
from commands.study.records import (atomic_json, done_steps, final_checkpoint, record_problem, set_aside_unverified,
                                    status, write_record)
from commands.study.spec import GAUSSIAN

class UnitError(RuntimeError):
    """A unit that cannot run or did not finish: one line naming the unit (and the file)."""


class Requeued(Exception):
    """A fit preempted under SLURM: its checkpoint is written and the job requeued; the task exits cleanly."""


def say(message: str) -> None:
    print(f"study.py: {message}", file=sys.stderr, flush=True)


def fit_command(unit: Unit) -> list[str]:
    """The ``train.py fit`` command line of a fit unit (run with this interpreter)."""
    return [sys.executable, "-m", "commands.study.train", "fit", "--config", str(unit.folder / "unit.yaml")]


def subprocess_env() -> dict[str, str]:
    """This environment, with the folder that holds the ``commands`` package first on PYTHONPATH
    (a source checkout run from another working directory imports it too)."""
    import commands

    root = str(Path(commands.__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_unit(plan: Plan, unit: Unit) -> None:
    """Run one unit to completion (what a local step and a SLURM array task both do)."""
    for dep in unit.deps:
        state = status(plan.units[dep])
        if state != "done":
            why = f" ({record_problem(plan.units[dep])})" if state == "invalid" else ""
            raise UnitError(f"unit {unit.id} needs {dep}, which is {'not done' if state == 'to do' else state}{why}")
    unit.folder.mkdir(parents=True, exist_ok=True)
    _log_executed(plan, unit)
    if unit.kind == "report":
        from commands.study.report import run_report

        return run_report(plan, unit)
    runner = {"score": run_fit, "aux": run_fit, "classifier": run_classifier, "bpd": run_bpd, "sample": run_sample}
    runner[unit.kind](plan, unit)


def _log_executed(plan: Plan, unit: Unit) -> None:
    import json

    plan.out.mkdir(parents=True, exist_ok=True)
    with open(plan.out / "executed.jsonl", "a") as handle:
        handle.write(json.dumps({"unit": unit.id, "time": time.time()}) + "\n")


def run_fit(plan: Plan, unit: Unit) -> None:
    """``train.py fit`` in a subprocess; an interrupted unit resumes from its newest valid checkpoint.

    Every attempt (start step, end step, wall time, exit status) is appended to ``attempts.jsonl``
    (the unit's training wall time and this machine's measured seconds per step). Outside SLURM,
    SIGTERM/SIGUSR1 are forwarded to train.py (which checkpoints at the next step and exits cleanly);
    under SLURM every process of the step gets them from SLURM itself.
    """
    import json

    for name in set_aside_unverified(unit):
        say(f"{unit.id}: moved {name}, which differs from what the unit wrote, aside to {name}.invalid")
    with open(unit.folder / "unit.yaml", "w") as handle:
        yaml.safe_dump(unit.run_config, handle, sort_keys=False)
    before, start = done_steps(unit), time.time()
    rc = _wait_forwarding_signals(subprocess.Popen(fit_command(unit), env=subprocess_env()))
    after = done_steps(unit)
    with open(unit.folder / "attempts.jsonl", "a") as handle:
        handle.write(json.dumps({"start": start, "wall_s": time.time() - start, "rc": rc,
                                 "step_before": before, "step_after": after}) + "\n")
    _check_requeued(unit, rc, start, after)
    if rc != 0:
        raise UnitError(f"unit {unit.id}: train.py fit exited with status {rc} (log above)")
    final = final_checkpoint(unit)
    if final is None:
        raise UnitError(f"unit {unit.id}: stopped at step {after} of {unit.params['trainer']['max_steps']} "
                        "(preempted?); run the study again to resume it")
    write_record(unit, [final] + [p for p in (unit.folder / "config.yaml",) if p.is_file()])


def preemption_checkpoint(unit: Unit, since: float) -> Path | None:
    """The checkpoint callbacks.Preemption wrote in the unit's run folder at or after ``since``
    (``checkpoints/<filename>``, ``preempt.ckpt`` unless the config names another), else None."""
    name = "preempt.ckpt"
    for callback in ((unit.run_config or {}).get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("Preemption"):
            name = (callback.get("init_args") or {}).get("filename", name)
    path = unit.folder / "checkpoints" / name
    return path if path.is_file() and path.stat().st_mtime >= since else None


def _check_requeued(unit: Unit, rc: int, start: float, step: int) -> None:
    """Under SLURM a fit killed by SIGTERM (rc -15: ``scontrol requeue`` stops the running job) after
    this attempt wrote its preemption checkpoint was requeued, not failed: say so and raise
    :class:`Requeued` so the task exits cleanly and SLURM's requeue proceeds."""
    if not os.environ.get("SLURM_JOB_ID") or rc != -signal.SIGTERM:
        return
    ckpt = preemption_checkpoint(unit, start)
    if ckpt is not None:
        say(f"{unit.id}: preempted at step {step}, checkpoint {ckpt}; SLURM requeues the task, which resumes it")
        raise Requeued(unit.id)


def _wait_forwarding_signals(child: subprocess.Popen) -> int:
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    forward = (lambda s, f: None) if os.environ.get("SLURM_JOB_ID") else (lambda s, f: child.send_signal(s))
    for s in previous:
        signal.signal(s, forward)
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_classifier(plan: Plan, unit: Unit) -> None:
    """Train the digit classifier on the training split; cache weights, test accuracy and data digest."""
    from difftime import quality

    start = time.time()
    splits = build_object(unit.params["data"]).splits()
    train, test = splits["train"], splits["test"]
    trained = quality.train_classifier((train.data, train.labels), (test.data, test.labels),
                                       epochs=unit.params["epochs"], seed=unit.params["seed"])
    quality.save_classifier(trained, unit.folder / "classifier.pt")
    atomic_json(unit.folder / "result.json", {"test_accuracy": trained.test_accuracy, "data_digest": trained.data_digest,
                                              "n_train": len(train), "n_test": len(test), "wall_s": time.time() - start})
    write_record(unit, [unit.folder / "classifier.pt", unit.folder / "result.json"])


def score_run(plan: Plan, unit: Unit) -> tuple[Path, Path]:
    """The score unit's saved run config and final checkpoint."""
    score = plan.units[unit.params["score"]]
    ckpt = final_checkpoint(score)
    if ckpt is None:
        raise UnitError(f"unit {unit.id}: the score model {score.id} has no final checkpoint")
    return score.folder / "config.yaml", ckpt


def aux_checkpoint(plan: Plan, unit: Unit) -> Path | None:
    return final_checkpoint(plan.units[unit.params["aux"]]) if unit.params["aux"] else None


def eval_T(unit: Unit) -> float | None:
    """T' of post-hoc truncation, None when the unit evaluates the model at its trained T."""
    return None if unit.params["T"] == unit.params["T_train"] else float(unit.params["T"])


def _accelerator(device: str) -> dict[str, Any]:
    import torch

    parsed = torch.device(device)
    if parsed.type == "cuda":
        return {"accelerator": "gpu", "devices": [parsed.index] if parsed.index is not None else 1}
    return {"accelerator": "cpu", "devices": 1}


def run_bpd(plan: Plan, unit: Unit) -> None:
    """callbacks.BitsPerDim on the validation set at T' with the unit's prior, on the score model's
    final checkpoint loaded by :func:`commands.runs.load_run` (a Lightning ``validate`` in this process)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import BitsPerDim
    from commands.runs import load_run
    from difftime.checkpoints import checkpoint_step

    config_path, ckpt = score_run(plan, unit)
    aux, bpd = aux_checkpoint(plan, unit), unit.params["bpd"]
    start = time.time()
    model, datamodule = load_run(ckpt, config_path, prior=str(aux) if aux else GAUSSIAN, eval_T=eval_T(unit),
                                 device=plan.spec.device)
    precision = ((yaml.safe_load(config_path.read_text()) or {}).get("trainer") or {}).get("precision")
    callback = BitsPerDim(**{k: bpd[k] for k in ("max_samples", "n_t", "n_prior", "ode", "ode_max_samples", "seed")})
    logger = TensorBoardLogger(save_dir=str(unit.folder.parent.parent), name="bpd", version=unit.folder.name)
    trainer = Trainer(**_accelerator(plan.spec.device), logger=logger, callbacks=[callback], num_nodes=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      use_distributed_sampler=False, **({"precision": precision} if precision else {}))
    trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/bpd")}
    atomic_json(unit.folder / "result.json", {**metrics, "n": bpd["max_samples"], "checkpoint": str(ckpt),
                                              "checkpoint_step": checkpoint_step(ckpt), "wall_s": time.time() - start})
    write_record(unit, [unit.folder / "result.json"])


def run_sample(plan: Plan, unit: Unit) -> None:
    """:func:`commands.sampling.sample` with the unit's sampler, steps, seeds, prior and T' (in this
    process), then the prior's draw cost per sample. Outputs go to a temporary folder renamed into place."""
    from difftime.checkpoints import checkpoint_step

    config_path, ckpt = score_run(plan, unit)
    aux, p = aux_checkpoint(plan, unit), unit.params
    for stale in unit.folder.glob("samples.tmp*"):  # left by an interrupted attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = unit.folder / f"samples.tmp{os.getpid()}"
    summary = _sample(config=str(config_path), ckpt_path=str(ckpt), prior=str(aux) if aux else GAUSSIAN,
                      eval_T=eval_T(unit), sampler=p["sampler"], steps=p["steps"], n=p["n"], seed=p["seed"],
                      batch_size=plan.spec.sample_batch_size, out=str(tmp), device=plan.spec.device,
                      **({"sampler_options": p["sampler_options"]} if "sampler_options" in p else {}))
    prior_s = prior_draw_cost(aux, summary, p["n"], p["seed"])
    if (unit.folder / "samples").exists():
        shutil.rmtree(unit.folder / "samples")
    tmp.replace(unit.folder / "samples")
    atomic_json(unit.folder / "result.json", {**{k: v for k, v in summary.items() if k not in ("npz", "png")},
                                              "prior_s_per_sample": prior_s, "checkpoint_step": checkpoint_step(ckpt)})
    write_record(unit, [unit.folder / "samples" / name for name in ("samples.npz", "samples.png", "info.json")]
                 + [unit.folder / "result.json"])


def _sample(**options: Any) -> dict[str, Any]:
    """One sample run with typed options (:class:`commands.sampling.SampleOptions`)."""
    from commands.sampling import SampleOptions, sample

    return sample(SampleOptions(**options, progress=False))


def prior_draw_cost(aux: Path | None, summary: dict[str, Any], n: int, seed: int) -> float:
    """Seconds per sample of drawing x_T' from the prior alone (per-sample seeds, as the sampler)."""
    import numpy as np
    import torch

    from difftime.aux_priors import AuxPriorCheckpoint
    from difftime.priors import GaussianPrior
    from difftime.randomness import PerSampleNoise

    shape = tuple(np.load(summary["npz"])["samples"].shape[1:])
    prior = AuxPriorCheckpoint(str(aux)) if aux is not None else GaussianPrior(shape)
    start = time.perf_counter()
    with torch.no_grad():
        prior.sample(n, PerSampleNoise([seed + i for i in range(n)]))
    return (time.perf_counter() - start) / n


__all__ = ["Requeued", "UnitError", "fit_command", "preemption_checkpoint", "run_unit", "run_fit", "run_classifier",
           "run_bpd", "run_sample", "prior_draw_cost", "score_run", "eval_T"]
