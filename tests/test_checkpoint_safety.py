"""Checkpoints and resume lose nothing (issue 10, defects 3-8, 14, 15).

Every test here failed on the code before the fix; each names its defect.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from commands.run_lock import RunFolderLock as RunLock
from difftime.checkpoints import find_resume_checkpoint, verify_checkpoint
from test_fault_tolerance import TOY, small_checkpoint, write_config

ROOT = Path(__file__).resolve().parents[1]
EVERY_STEP = ["--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1"]


def fit(tmp_path: Path, monkeypatch, *extra: str, max_steps: int = 2):
    """In-process ``train.py fit`` of the 2-D toy config in ``tmp_path``; returns the CLI."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=max_steps)
    return train.main(args=["fit", "--config", str(config), *EVERY_STEP, f"--trainer.max_steps={max_steps}", *extra])


def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs/toy/run/checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_corrupt_last_ckpt_is_moved_aside_and_last_ckpt_is_written_again(tmp_path, monkeypatch):
    """Defect 3: the damaged last.ckpt stayed in place and Lightning wrote last-v1.ckpt."""
    fit(tmp_path, monkeypatch, max_steps=2)
    last = ckpt_dir(tmp_path) / "last.ckpt"
    truncate(last)
    with pytest.warns(UserWarning, match="last.ckpt"):
        cli = fit(tmp_path, monkeypatch, max_steps=3)
    assert cli.trainer.global_step == 3
    verify_checkpoint(last)
    assert step_of(last) == 3
    assert (ckpt_dir(tmp_path) / "last.ckpt.corrupt").is_file()
    assert not list(ckpt_dir(tmp_path).glob("last-v*.ckpt"))


class NotAllowed:
    """Any class outside torch's weights-only allowlist."""


def test_a_zip_that_weights_only_refuses_is_skipped_as_corrupt(tmp_path):
    """Defect 4: a valid zip with a refused pickle was chosen as the newest and aborted the resume."""
    small_checkpoint(tmp_path / "step=00000010.ckpt", 10)
    torch.save({"global_step": 20, "thing": NotAllowed()}, tmp_path / "step=00000020.ckpt")
    verify_checkpoint(tmp_path / "step=00000020.ckpt")  # the CRCs are fine
    with pytest.warns(UserWarning, match="step=00000020.ckpt"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step=00000010.ckpt"


def test_explicit_corrupt_ckpt_path_falls_back_to_the_checkpoint_before_it(tmp_path, monkeypatch, capsys):
    """Defect 5: it fell back to the newest valid checkpoint of the folder (here a newer one)."""
    from commands import cli as train

    fit(tmp_path, monkeypatch, max_steps=3)
    folder = ckpt_dir(tmp_path)
    truncate(folder / "step=00000002.ckpt")
    with pytest.warns(UserWarning, match="step=00000001.ckpt"):
        cli = fit(tmp_path, monkeypatch, f"--ckpt_path={folder / 'step=00000002.ckpt'}", max_steps=4)
    assert Path(cli.config.fit.ckpt_path).name == "step=00000001.ckpt"
    assert (folder / "step=00000002.ckpt.corrupt").is_file()
    truncate(folder / "step=00000003.ckpt")  # evaluation never silently evaluates another file
    with pytest.raises(SystemExit) as stop:
        train.main(args=["validate", "--config", str(tmp_path / "config.yaml"),
                         f"--ckpt_path={folder / 'step=00000003.ckpt'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "step=00000003.ckpt" in err and "refusing to validate" in err


def test_all_invalid_checkpoints_refuse_unless_fresh_start(tmp_path, monkeypatch, capsys):
    """Defect 6: with every checkpoint invalid, training silently restarted from step 0."""
    fit(tmp_path, monkeypatch, max_steps=1)
    for path in ckpt_dir(tmp_path).glob("*.ckpt"):
        truncate(path)
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as stop:
        fit(tmp_path, monkeypatch, max_steps=2)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "last.ckpt" in err and "step=00000001.ckpt" in err and "--fresh_start" in err
    with pytest.warns(UserWarning):
        cli = fit(tmp_path, monkeypatch, "--fresh_start=true", max_steps=2)
    assert cli.trainer.global_step == 2 and step_of(ckpt_dir(tmp_path) / "last.ckpt") == 2


def test_orphan_temp_files_are_removed_at_start_up(tmp_path, monkeypatch):
    """Defect 7: temp files of writes killed mid-way (1 GB each at CIFAR-10 scale) stayed forever."""
    fit(tmp_path, monkeypatch, max_steps=1)
    orphan = ckpt_dir(tmp_path) / ".last.ckpt.k2j3h4.tmp"
    orphan.write_bytes(b"partial write")
    fit(tmp_path, monkeypatch, max_steps=2)
    assert not orphan.exists()


def test_second_fit_on_a_locked_run_folder_is_refused(tmp_path, monkeypatch, capsys):
    """Defect 8: two fits on one run folder both ran and interleaved their checkpoints."""
    import socket

    run = tmp_path / "runs/toy/run"
    run.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"pid={other.pid}\nhost={socket.gethostname()}\nslurm_job=\n")
        with pytest.raises(SystemExit) as stop:
            fit(tmp_path, monkeypatch, max_steps=1)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"in use by pid {other.pid}" in err
        assert not (run / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()
    cli = fit(tmp_path, monkeypatch, max_steps=1)  # the owner is dead: a stale lock is taken over
    assert cli.trainer.global_step == 1 and not (run / ".lock").exists()


def test_run_lock_of_a_live_process_elsewhere_is_kept(tmp_path, monkeypatch):
    lock = RunLock(tmp_path)
    (tmp_path / ".lock").write_text("pid=1\nhost=another-node\nslurm_job=77\n")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RuntimeError, match="another-node"):
        lock.acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: its old lock is stale
    lock.acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_preemption_checkpoint_logs_no_weights_only_default(tmp_path, monkeypatch):
    """Defect 14: "`weights_only` was not set, defaulting to `False`" was printed at preemption."""
    from callbacks.preemption import Preempted

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(Preempted):
            fit(tmp_path, monkeypatch, "--trainer.callbacks+=fault_helpers.SignalAt",
                "--trainer.callbacks.init_args.step=1", max_steps=4)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        signal.signal(signal.SIGUSR1, previous)
    assert (ckpt_dir(tmp_path) / "preempt.ckpt").is_file()
    assert not [m for m in records if "weights_only" in m], records


def test_second_signal_during_teardown_is_absorbed(tmp_path):
    """Defect 15: teardown re-armed SIG_DFL, so a second SIGUSR1 killed the process (status -10)."""
    script = textwrap.dedent("""
        import os, signal
        from callbacks.preemption import Preemption
        p = Preemption()
        p.on_train_start(None, None)
        os.kill(os.getpid(), signal.SIGUSR1)  # the preemption, handled at the next step boundary
        assert p.received == signal.SIGUSR1
        p.teardown(None, None, "fit")
        os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler repeats itself while we wind down
        os.kill(os.getpid(), signal.SIGTERM)
        print("exited cleanly")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "exited cleanly" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_teardown_without_preemption_restores_the_previous_handlers():
    from callbacks.preemption import Preemption

    previous = signal.getsignal(signal.SIGUSR1)
    p = Preemption(signals=("SIGUSR1",))
    p.on_train_start(None, None)
    assert signal.getsignal(signal.SIGUSR1) == p._handle
    p.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == previous
