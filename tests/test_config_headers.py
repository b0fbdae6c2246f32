"""Every command in a config header (the comment block at the top of ``configs/**/*.yaml``) runs as
written, from the repository root.

The commands are extracted from the headers (lines ``#   python ...``, ``#   difftime-...``,
``#   sbatch ...``, with ``\\`` continuations; ``[--dry-run]`` and trailing ``(or: ...)`` notes are
removed) and each is checked in a scratch folder holding ``configs/`` and ``scripts/`` as in a
clone, so that relative paths mean what they mean to a reader:

* RUN: ``python train.py fit`` commands whose data ship with the packages are run as written plus
  small overrides (:data:`TINY`: 2 steps on one CPU, no progress bar; a score model's sample grid
  at 2 sampler steps). Two-stage headers run in order in one folder, so the second stage loads the
  checkpoint the first one wrote at the path the header names (the toy-ring and 8x8-digits score
  configs run there). ``python study.py --config configs/study/toy_tiny.yaml --dry-run`` runs.
* PARSE: the rest is checked for parseability only, to keep this test under two minutes on one
  core: ``--print_config`` for ``train.py`` (MNIST and CIFAR-10 are not on this machine; the
  ``configs/T`` files, the other auxiliary flows and the other T values repeat the run commands
  with other files), the spec check and plan (``load_spec``, ``make_plan``) for study specs whose
  ``--dry-run`` checks every fit config (about 40 s each), and for ``sbatch`` (no SLURM here) that
  the script and the config it names exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
TINY = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0"]
#: header files whose train.py commands are run (offline data, seconds at 2 steps); the plain
#: commands of configs/toy_ring.yaml and configs/digits8x8.yaml run as the second stages here
RUN = {"configs/aux/toy_ring_realnvp.yaml", "configs/aux/digits8x8_glow.yaml", "configs/quickstart.yaml",
       "configs/toy_gaussian.yaml"}
#: a score model's final sample grid at 2 sampler steps instead of its 30 (the grid is the cost of a 2-step fit)
FEW_SAMPLER_STEPS = ["--model.init_args.sampler.init_args.steps", "2"]
#: study specs whose --dry-run is run as written (the others: spec check and plan)
DRY_RUN = {"configs/study/toy_tiny.yaml"}
_COMMAND = re.compile(r"#\s{2,}((?:python |difftime-|sbatch ).*)")


def header_commands(path: Path) -> list[str]:
    """The commands of the leading comment block of ``path``, continuations joined, notes removed."""
    commands, pending = [], None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if pending is not None:
            pending += " " + text
        elif match := _COMMAND.fullmatch(line):
            pending = match.group(1).strip()
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(clean(pending))
        pending = None
    return commands


def clean(command: str) -> str:
    """Drop optional ``[...]`` flags and a trailing ``(or: ...)`` note."""
    command = re.split(r"\s{2,}\(", command)[0]
    return re.sub(r"\s*\[[^\]]*\]", "", command).strip()


def test_headers_are_extracted():
    """The extractor sees the two-stage recipes (an independent count of the header lines)."""
    found = {name: header_commands(ROOT / name) for name in CONFIGS}
    assert found["configs/aux/digits8x8_glow.yaml"] == [
        "python train.py fit --config configs/aux/digits8x8_glow.yaml --config configs/T/0.4.yaml",
        "python train.py fit --config configs/digits8x8.yaml --config configs/T/0.4.yaml "
        "--model.init_args.prior difftime.aux_priors.AuxPriorCheckpoint "
        "--model.init_args.prior.path runs/aux_digits8x8_glow/T0.4/checkpoints/last.ckpt"]
    assert found["configs/study/toy_tiny.yaml"] == ["python study.py --config configs/study/toy_tiny.yaml"]
    assert sum(len(commands) for commands in found.values()) >= 30
    assert all(command.split()[0] in ("python", "sbatch", "difftime-study") for v in found.values() for command in v)


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Path:
    """A scratch folder that looks like the repository root to relative paths."""
    for name in ("configs", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_train(argv: list[str], parse_only: bool, capsys) -> None:
    from commands import cli

    if parse_only:
        with pytest.raises(SystemExit) as stop:
            cli.main(args=[*argv, "--print_config"])
        printed = capsys.readouterr().out
        assert stop.value.code in (0, None) and "model:" in printed, printed[-2000:]
        return
    score_model = "configs/aux/" not in argv[argv.index("--config") + 1]
    trained = cli.main(args=[*argv, *TINY, *(FEW_SAMPLER_STEPS if score_model else [])])
    assert trained.trainer.state.finished and trained.trainer.global_step == 2, argv


def run_study(argv: list[str], dry_run: bool) -> None:
    from commands.study.check import load_spec
    from commands.study.cli import main, parse_args
    from commands.study.plan import make_plan

    if dry_run:
        plan = main([*argv, "--dry-run"])
        assert plan.units
        return
    args = parse_args(argv)
    spec = load_spec(args.config, "slurm" if args.executor == "slurm" else "local")
    assert make_plan(spec, args.config).units


@pytest.mark.parametrize("name", [n for n in CONFIGS if header_commands(ROOT / n)])
def test_header_commands_run_as_written(name, clone, capsys):
    for command in header_commands(ROOT / name):
        words = shlex.split(command)
        if words[0] == "sbatch":  # no SLURM here: the script and its config must exist
            assert all((clone / w).exists() for w in words[1:] if "/" in w), command
        elif words[:2] == ["python", "train.py"] or words[0] == "difftime-train":
            argv = words[2:] if words[0] == "python" else words[1:]
            run_train(argv, parse_only=name not in RUN, capsys=capsys)
        elif words[:2] == ["python", "study.py"] or words[0] == "difftime-study":
            argv = words[2:] if words[0] == "python" else words[1:]
            run_study(argv, dry_run=name in DRY_RUN)
        else:
            pytest.fail(f"{name}: no rule for the header command {command!r}")


def test_prior_given_as_a_checkpoint_path(clone, capsys):
    """The short form ``--model.init_args.prior <checkpoint>`` a reader would try first."""
    checkpoint = clone / "runs/aux/last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04\x80\x81 not text")  # a zip archive, as torch.save writes
    run_train(["fit", "--config", "configs/toy_ring.yaml", "--model.init_args.prior", str(checkpoint)],
              parse_only=True, capsys=capsys)
