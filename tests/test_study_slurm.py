"""The study's SLURM template (commands/study/slurm_study.sh) with stand-in sbatch, srun and
scontrol: what it submits, and what an array task does when its unit fails or SIGUSR1 arrives
outside train.py's handler. The real scheduler is exercised in tests/test_slurm_real.py."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import commands.study as study
from commands.study.executors import SLURM_SCRIPT

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "study" / "toy_tiny.yaml"


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def submit(tmp_path: Path, monkeypatch, **env: str) -> list[str]:
    """Submit toy_tiny through the template; returns the sbatch calls, one line each."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(tmp_path / "study")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / "sbatch.log"
    stand_in(tmp_path / "bin", "sbatch", f'echo "$@" >> {log}\necho $(( $(wc -l < {log}) + 100 ))')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    study.main(["--config", str(path), "--executor", "slurm"])
    return log.read_text().splitlines()


def test_dependent_stages_are_cancelled_when_a_dependency_fails(tmp_path, monkeypatch):
    calls = submit(tmp_path, monkeypatch)
    assert len(calls) == 4
    for call in calls[:2]:
        assert "dependency" not in call and "--kill-on-invalid-dep" not in call
    for call in calls[2:]:
        assert "--kill-on-invalid-dep=yes" in call.split() and "--dependency=afterok:" in call
    assert all("--gpus-per-task=1" in c.split() and "--cpus-per-task=8" in c.split() for c in calls[:3])


def test_cpu_partition_requests_no_gpus(tmp_path, monkeypatch):
    calls = submit(tmp_path, monkeypatch, GPUS_PER_TASK="0", CPUS_PER_TASK="2")
    assert not any("--gpus-per-task" in c for c in calls)
    assert all("--cpus-per-task=2" in c.split() for c in calls)


def array_task(tmp_path: Path, python_body: str) -> subprocess.CompletedProcess:
    """The template's array-task branch with a stand-in interpreter, srun (runs its command) and scontrol."""
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "python", python_body)
    stand_in(bin_dir, "srun", 'shift; exec "$@"')  # drop --kill-on-bad-exit=1
    stand_in(bin_dir, "scontrol", 'echo "   StdErr=/logs/x.err StdIn=/dev/null StdOut=/logs/study-train-7_3.out"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "11"}
    return subprocess.run(["bash", str(SLURM_SCRIPT), "--task", "train", "spec.yaml"], env=env, capture_output=True,
                          text=True, timeout=60, preexec_fn=default_sigusr1)


def default_sigusr1() -> None:
    """Start a child with SIGUSR1's default action, as SLURM starts a task (an ignored signal is
    inherited, and an in-process fit earlier in this pytest process may have left it ignored)."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_failed_task_names_its_unit_and_log_and_exits_non_zero(tmp_path):
    body = 'if [[ " $* " == *" --task-unit train 3 "* ]]; then echo score/T1-abc; exit 0; fi\nexit 3'
    run = array_task(tmp_path, body)
    assert run.returncode == 3
    assert "unit score/T1-abc failed (exit status 3); its log: /logs/study-train-7_3.out" in run.stderr


def test_sigusr1_outside_the_fit_does_not_kill_the_task(tmp_path):
    """SIGUSR1's default action terminates (exit 138); the task ignores it until train.py handles it."""
    run = array_task(tmp_path, 'kill -USR1 $$\nsleep 0.2\necho "alive after USR1"')
    assert run.returncode == 0, run.stderr
    assert "alive after USR1" in run.stdout
    plain = subprocess.run(["bash", "-c", "kill -USR1 $$; echo alive"], capture_output=True, text=True, timeout=30,
                           preexec_fn=default_sigusr1)
    assert plain.returncode == -signal.SIGUSR1 and "alive" not in plain.stdout  # the default it guards against


def test_scripts_door_submits_through_the_study_command(tmp_path):
    stand_in(tmp_path / "bin", "python", 'printf "%s\\n" "$@"')
    env = {**os.environ, "PYTHON": str(tmp_path / "bin" / "python")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_study.sh"), "s.yaml"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert run.stdout.splitlines() == ["-m", "commands.study", "--config", "s.yaml", "--executor", "slurm"]


def fit_unit(tmp_path: Path):
    """The score unit of toy_tiny (planning only: nothing trains)."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(tmp_path / "study")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    plan = study.make_plan(study.load_spec(path), path)
    return plan, next(u for u in plan.units.values() if u.kind == "score")


def fake_fit(monkeypatch, script: str) -> None:
    """train.py replaced by a child that runs ``script`` (it may write the preemption checkpoint)."""
    import sys

    from commands.study import units

    monkeypatch.setattr(units, "fit_command", lambda unit: [sys.executable, "-c", script])


KILLED_AFTER_PREEMPT = ("import os, signal, pathlib; d = pathlib.Path('checkpoints'); d.mkdir(exist_ok=True); "
                        "(d / 'preempt.ckpt').write_bytes(b'x'); os.kill(os.getpid(), signal.SIGTERM)")


@pytest.mark.parametrize("slurm, checkpoint, requeued", [(True, True, True), (True, False, False),
                                                         (False, True, False)],
                         ids=["slurm-preempted", "slurm-no-checkpoint", "local"])
def test_sigterm_after_a_preemption_checkpoint_is_a_requeue_under_slurm(tmp_path, monkeypatch, capsys, slurm,
                                                                        checkpoint, requeued):
    from commands.study.units import Requeued, UnitError, run_fit

    plan, unit = fit_unit(tmp_path)
    unit.folder.mkdir(parents=True)
    monkeypatch.chdir(unit.folder)
    script = KILLED_AFTER_PREEMPT if checkpoint else "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    fake_fit(monkeypatch, script)
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(Requeued if requeued else UnitError) as caught:
        run_fit(plan, unit)
    if requeued:
        err = capsys.readouterr().err
        assert f"{unit.id}: preempted" in err and "SLURM requeues the task" in err
    else:
        assert f"exited with status {-signal.SIGTERM}" in str(caught.value)


def test_a_preemption_checkpoint_from_an_earlier_attempt_does_not_count(tmp_path):
    _, unit = fit_unit(tmp_path)
    ckpt = unit.folder / "checkpoints" / "preempt.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (1000.0, 1000.0))
    from commands.study.units import preemption_checkpoint

    assert preemption_checkpoint(unit, since=2000.0) is None
    assert preemption_checkpoint(unit, since=500.0) == ckpt
