"""Every command the README shows runs as written, in the order a reader meets them.

The ```bash blocks and the ```python block of README.md are extracted (``\\`` continuations
joined, trailing ``# comments`` dropped) and run in a scratch folder that looks like a clone
(``configs/`` and ``scripts/`` linked), so relative paths mean what they mean to a reader. Each
command runs for real at a tiny size: fits with 2 training steps (:data:`TINY`), sampling with 4
samples of 2 sampler steps, validation on one batch. ``make X`` runs the Makefile's recipe for X
(``quickstart``: its ``train.py fit`` line at the tiny size; ``test``: ``make -n``, which the suite
is already running). Study commands run the spec check and plan; ``--dry-run`` runs as written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from test_config_headers import FEW_SAMPLER_STEPS, TINY, clone, run_study  # noqa: F401 - clone is a fixture

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def readme_commands() -> list[tuple[str, str]]:
    """(language, command) in README order; a python block is one command."""
    found = []
    for language, body in _BLOCK.findall(README):
        if language == "python":
            found.append((language, body))
            continue
        pending = ""
        for line in body.splitlines():
            line = re.split(r"\s+#\s", line)[0].rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            if (pending + line).strip():
                found.append((language, (pending + line).strip()))
            pending = ""
    return found


def test_readme_commands_are_extracted():
    """An independent count: the README's fenced commands, as a reader sees them."""
    commands = [c for _, c in readme_commands()]
    assert commands[:2] == ["make quickstart", "make test"]
    assert sum(c.startswith("python train.py fit") for c in commands) == 2
    assert any(c.startswith("python sample.py") and "--eval_T 0.4" in c for c in commands)
    assert any(c.startswith("python study.py") and "--dry-run" in c for c in commands)
    assert all(c.split()[0] in ("make", "python", "bash", "sudo") or lang == "python"
               for lang, c in readme_commands())


def make_recipe(target: str) -> list[str]:
    """The ``train.py`` line of a Makefile target, as argv after ``train.py``."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    line = next(ln for ln in recipe.splitlines() if "train.py" in ln)
    return shlex.split(line.split("train.py", 1)[1])


def run_command(language: str, command: str, clone: Path) -> None:
    from commands import cli, sampling

    if language == "python":
        exec(compile(command, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet
        return
    words = shlex.split(command)
    if words[0] == "make":
        if words[1] == "quickstart":
            argv = make_recipe("quickstart")
            assert cli.main(args=[*argv, *TINY, *FEW_SAMPLER_STEPS]).trainer.global_step == 2
        else:
            subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, check=True, capture_output=True)
    elif words[:3] == ["python", "train.py", "fit"]:
        score = "configs/aux/" not in words[4]
        assert cli.main(args=[*words[2:], *TINY, *(FEW_SAMPLER_STEPS if score else [])]).trainer.global_step == 2
    elif words[:3] == ["python", "train.py", "validate"]:
        cli.main(args=[*words[2:], "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    elif words[:2] == ["python", "sample.py"]:
        info = sampling.main([*words[2:], "--n", "4", "--batch_size", "4", "--steps", "2"])
        out = clone / words[words.index("--out") + 1]
        assert (out / "samples.png").is_file() and info["nfe"] >= 2
    elif words[:2] == ["python", "study.py"]:
        run_study(words[2:], dry_run="--dry-run" in words)
    else:
        pytest.fail(f"README: no rule for the command {command!r}")


@pytest.mark.slow
def test_readme_commands_run_as_written(clone):
    ran = []
    for language, command in readme_commands():
        if command.startswith(("sudo ", "bash ")) or ".venv/bin/python -m pytest" in command:
            continue  # the cluster commands of docs/cluster.md have their own tests (tests/test_slurm_real.py)
        run_command(language, command, clone)
        ran.append(command)
    assert len(ran) >= 10
