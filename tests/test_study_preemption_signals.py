"""callbacks.preemption teardown without a preemption: a late SIGUSR1 (SLURM's --signal=USR1@N after
the fit ended) must not kill the finished process with exit 138, while SIGTERM keeps its action."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_late_sigusr1_after_a_fit_without_preemption_does_not_kill():
    result = run("""
        import os, signal
        from callbacks.preemption import Preemption
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        p = Preemption()
        p.on_train_start(None, None)
        p.teardown(None, None, "fit")          # the fit ended without a signal
        os.kill(os.getpid(), signal.SIGUSR1)   # SLURM's warning arrives late
        print("exited cleanly")
    """)
    assert result.returncode == 0 and "exited cleanly" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_sigterm_keeps_its_default_and_a_custom_handler_comes_back():
    result = run("""
        import os, signal
        from callbacks.preemption import Preemption
        mine = lambda s, f: print("custom handler ran", flush=True)
        signal.signal(signal.SIGUSR1, mine)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        p = Preemption()
        p.on_train_start(None, None)
        p.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) is mine
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)   # still terminates: a termination request, not a warning
        print("not reached")
    """)
    assert "custom handler ran" in result.stdout and "not reached" not in result.stdout
    assert result.returncode == -signal.SIGTERM
